"""MoE (``E``) layers on the CPU: the config, what megatron is told, the geometry, FLOPs by active parameters,
the memory estimate with expert parallelism, the dry run, and the one-line refusals."""

from __future__ import annotations

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.model import flops, geometry, memory

TINY = "configs/tiny.yaml"
MOE = ["model.hybrid_layer_pattern=MEM*E|MEM*E", "model.moe_num_experts=8", "model.moe_top_k=2",
       "model.moe_ffn_hidden_size=768", "model.moe_shared_expert_size=384"]


def _cfg(*overrides):
    return load_run_config(TINY, [*MOE, *overrides])


def test_megatron_gets_its_moe_fields():
    from hybrid_megatron.model.build import build_transformer_config, moe_kwargs

    kw = moe_kwargs(_cfg())
    assert {k: kw[k] for k in ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                               "moe_shared_expert_intermediate_size", "moe_router_dtype", "moe_grouped_gemm",
                               "moe_expert_capacity_factor")} == {
        "num_moe_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 768,
        "moe_shared_expert_intermediate_size": 384, "moe_router_dtype": "fp32", "moe_grouped_gemm": True,
        "moe_expert_capacity_factor": None}  # dropless
    assert moe_kwargs(load_run_config(TINY)) == {}
    config = build_transformer_config(_cfg())  # megatron's TransformerConfig accepts them
    assert config.num_moe_experts == 8 and config.moe_router_score_function == "sigmoid"


def test_geometry_flops_and_active_parameters():
    m = _cfg().model
    H, E, Fe, S = 512, 8, 768, 384
    g = geometry.layer(m, "E")
    assert g.total == H + E * H + E * 2 * Fe * H + 2 * S * H
    assert g.expert == E * 2 * Fe * H and g.replicated == H + E * H  # the pre-norm and the router
    cost = flops.layer_cost(m, "E", 1024)
    assert cost.flops_per_token == 2 * (E * H + 2 * Fe * H * 2 + 2 * S * H)  # router, top-2 experts, shared
    assert cost.active_params == g.total - 6 * 2 * Fe * H
    assert flops.num_parameters(m, 384) - flops.active_parameters(m, 384) == 4 * 6 * 2 * Fe * H
    dense = load_run_config(TINY).model
    assert flops.active_parameters(dense, 384) == flops.num_parameters(dense, 384)


def test_expert_parallelism_divides_expert_memory():
    one = memory.estimate(_cfg(), 384, 1024, world_size=8)[0]
    ep = memory.estimate(_cfg("parallel.expert_model_parallel_size=4"), 384, 1024, world_size=8)[0]
    expert_bytes = 4 * geometry.layer(_cfg().model, "E").expert
    assert one.grads - ep.grads == pytest.approx(4 * expert_bytes * 3 / 4)
    assert ep.activations == one.activations


@pytest.mark.parametrize("overrides, message", [
    (["model.moe_num_experts=null"], "has MoE layers ('E'): set model.moe_num_experts"),
    (["model.hybrid_layer_pattern=M-M*-"], "model.moe_num_experts is set but"),
    (["model.moe_top_k=9"], "model.moe_top_k=9: must lie in [1, model.moe_num_experts=8]"),
    (["parallel.expert_model_parallel_size=3"], "does not divide model.moe_num_experts=8"),
    (["model.layer_spec=local"], "need Transformer Engine's grouped GEMM"),
    (["model.moe_expert_bias=true", "model.moe_router_score_function=softmax"], "needs model.moe_router_score_function"),
    (["parallel.tensor_model_parallel_size=2"], "need parallel.sequence_parallel=true"),
])
def test_bad_moe_configs_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _cfg(*overrides)


def test_the_dry_run_prints_total_and_active_parameters(capsys):
    assert main(["pretrain", TINY, "--dry-run", *MOE]) == 0
    out = capsys.readouterr().out
    assert "4 moe" in out and "active per token" in out and "top-2 of 8 experts" in out
    assert main(["pretrain", TINY, "--dry-run", *MOE, "parallel.expert_model_parallel_size=4"]) == 0
    assert "8 GPUs = TP 1 x PP 1 x DP 8 (experts over EP 4 of them)" in capsys.readouterr().out
    assert main(["pretrain", TINY, "--dry-run", "--gpus", "6", *MOE, "parallel.expert_model_parallel_size=4"]) == 2
    assert "does not divide the data-parallel size 6" in capsys.readouterr().err
