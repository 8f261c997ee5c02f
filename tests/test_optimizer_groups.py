"""The optimizer's parameter groups (training/optimizer.py ``param_group_overrides``) through megatron-core's
own grouping: the fp32 SSM parameters form groups of their own, without weight decay, and no group
mixes fp32 and bf16 parameters (a mixed group makes megatron-core 0.19 pair checkpointed optimizer
state with the wrong parameter)."""

from __future__ import annotations

from megatron_groups import Stack, megatron_param_groups


def test_ssm_params_get_their_own_undecayed_groups():
    model = Stack()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = megatron_param_groups(model, lr=1e-3, min_lr=1e-4, weight_decay=0.1)
    ssm = {f"layers.{i}.mixer.{n}" for i in range(2) for n in ("A_log", "D", "dt_bias")}
    seen = set()
    for g in groups:
        group_names = {names[id(p)] for p in g["params"]}
        seen |= group_names
        assert len({p.dtype for p in g["params"]}) <= 1, f"mixed dtypes in {sorted(group_names)}"
        if group_names & ssm:
            assert group_names <= ssm, f"SSM params share a group with {sorted(group_names - ssm)}"
            assert g.get("start_wd") == 0.0 and g.get("end_wd") == 0.0
    assert seen == set(names.values())
    decayed = [g for g in groups if g["wd_mult"] == 1.0 and "start_wd" not in g]
    assert {names[id(p)] for g in decayed for p in g["params"]} == {"layers.0.mixer.in_proj.weight",
                                                                       "layers.1.mixer.in_proj.weight", "fc.weight"}
