"""NemotronH MoE layers through the converter on a CPU: from-hf -> to-hf reproduces every tensor bit for bit (the
fp32 gate and its score-correction bias included), the model section says what megatron must compute, and what
NemotronH's moe layer cannot hold stops the export with one line. (Parity with megatron's own MoE forward:
the ``moe`` fixture of tests/test_convert_parity.py.)"""

from __future__ import annotations

import pytest
import torch
import yaml

from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.convert import checks
from hybrid_megatron.convert.testing import hf_tensors, random_nemotron_h

MOE = dict(hybrid_override_pattern="ME*E-", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, norm_topk_prob=True,
           routed_scaling_factor=2.5)


def test_moe_round_trip_is_exact_and_the_model_section_routes_like_nemotron_h(tmp_path):
    model = random_nemotron_h(seed=1, **MOE)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype", "fp32"]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "bf16",
                 "--no-progress"]) == 0
    original, exported = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        fp32 = key.endswith(("gate.weight", "e_score_correction_bias", "A_log", "D", "dt_bias"))
        assert exported[key].dtype == (torch.float32 if fp32 else torch.bfloat16), key
        assert torch.equal(exported[key].float(), tensor.float() if fp32 else tensor.bfloat16().float()), key
    assert original["backbone.layers.1.mixer.gate.e_score_correction_bias"].abs().sum() > 0
    step = next((tmp_path / "ckpt").glob("step-*"))
    m = yaml.safe_load((step / "run_config.yaml").read_text())["model"]
    assert {k: m[k] for k in ("moe_num_experts", "moe_top_k", "moe_ffn_hidden_size", "moe_shared_expert_size",
                              "moe_router_score_function", "moe_expert_bias", "moe_routed_scaling_factor")} == {
        "moe_num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 32, "moe_shared_expert_size": 48,
        "moe_router_score_function": "sigmoid", "moe_expert_bias": True, "moe_routed_scaling_factor": 2.5}


MODEL = ["model.hybrid_layer_pattern=MEM*E|MEM*E", "model.moe_num_experts=8", "model.moe_shared_expert_size=256"]


@pytest.mark.parametrize("overrides, problem", [
    (["model.moe_router_score_function=softmax"], "moe_router_score_function=softmax"),
    (["model.moe_top_k=1"], "moe_top_k=1"),
    (["model.moe_shared_expert_size=null"], "moe_shared_expert_size unset"),
])
def test_what_nemotron_h_moe_cannot_hold_is_one_line(overrides, problem):
    cfg = load_run_config("configs/tiny.yaml", [*MODEL, *overrides]).model
    assert [p for p in checks.export_problems(cfg) if p.startswith(problem)]
    assert checks.export_problems(load_run_config("configs/tiny.yaml", MODEL).model) == []
