"""Gated DeltaNet (``G``) layers on the CPU: the config, what megatron is told, the geometry (parameters,
fp32 names, FP8 widths), FLOPs, the memory estimate, the inference cache, the dry run and the export's refusal."""

from __future__ import annotations

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.model import flops, fp8_dims, geometry, inference_cache, memory
from hybrid_megatron.model.fp32_params import is_ssm_fp32_param

TINY = "configs/tiny.yaml"
GDN = ["model.hybrid_layer_pattern=G-G*-|G-G*-", "model.gdn_key_head_dim=64", "model.gdn_value_head_dim=64"]


def _cfg(*overrides):
    return load_run_config(TINY, [*GDN, *overrides])


def test_heads_default_to_qwen3_next_proportions_and_megatron_gets_its_linear_fields():
    m = _cfg().model  # hidden 512, head dims 64
    assert (m.num_gdn_key_heads, m.num_gdn_value_heads) == (8, 16)
    from hybrid_megatron.model.build import build_transformer_config, gdn_kwargs

    assert gdn_kwargs(m) == {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                             "linear_num_key_heads": 8, "linear_num_value_heads": 16}
    assert gdn_kwargs(load_run_config(TINY).model) == {}
    config = build_transformer_config(_cfg())  # megatron's TransformerConfig accepts them
    assert (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim) == (8, 16, 64)


def test_geometry_of_a_gdn_layer():
    m = _cfg().model
    H, qk, v, hv = 512, 8 * 64, 16 * 64, 16
    g = geometry.layer(m, "G")
    shapes = {p.name: p.shape for p in g.params}
    assert shapes == {
        "self_attention.in_proj.layer_norm_weight": (H,),
        "self_attention.in_proj.weight": (2 * qk + 2 * v + 2 * hv, H),  # [q | k | v | z | beta | alpha]
        "self_attention.conv1d.weight": (2 * qk + v, 1, 4),
        "self_attention.A_log": (hv,), "self_attention.dt_bias": (hv,),
        "self_attention.out_norm.weight": (64,),
        "self_attention.out_proj.weight": (H, v),
    }
    assert [p.name for p in g.params if p.fp32] == ["self_attention.A_log", "self_attention.dt_bias"]
    assert g.param("self_attention.in_proj.weight").parts == (
        ("query", qk), ("key", qk), ("value", v), ("z", v), ("beta", hv), ("alpha", hv))
    assert g.replicated == H + 64  # the pre-norm and the per-head output norm
    assert ("the Gated DeltaNet in_proj width 3104 / TP 2", 1552) in fp8_dims.gemm_dims(m, 2)


def test_fp32_rule_names_mamba_and_gdn_parameters_and_nothing_else():
    assert is_ssm_fp32_param("module.decoder.layers.0.self_attention.A_log")
    assert is_ssm_fp32_param("decoder.layers.5.self_attention.dt_bias")
    assert is_ssm_fp32_param("decoder.layers.3.mixer.D")
    assert not is_ssm_fp32_param("decoder.layers.5.self_attention.D")  # GatedDeltaNet has no D
    assert not is_ssm_fp32_param("decoder.layers.5.self_attention.out_norm.weight")


def test_flops_memory_and_inference_cache_count_the_gdn_layers():
    m = _cfg().model
    w = geometry.gdn_widths(m)
    mixing = 2 * 4 * w.conv + 16 * (64 * 128 + 64 * 192 + 6 * 64 * 64)
    assert flops.layer_cost(m, "G", 1024).flops_per_token == 2 * geometry.layer(m, "G").gemm + mixing
    assert flops.num_parameters(m, 384) == sum(g.total for g in geometry.layers(m)) + 2 * 384 * 512 + 512
    cfg = _cfg()
    est = memory.estimate(cfg, 384, 1024, world_size=1)[0]
    bigger = memory.estimate(_cfg("model.gdn_num_value_heads=32"), 384, 1024, world_size=1)[0]
    assert 0 < est.activations < bigger.activations
    state = 16 * 64 * 64 + w.conv * 3
    assert inference_cache.gdn_state_bytes(m) == 2 * state
    c = inference_cache.cache_bytes(m, 32768)
    assert c.gdn == 4 * 2 * state and c.mamba == 0 and c.attention == 2 * 32768 * 2 * 4 * 64 * 2


@pytest.mark.parametrize("overrides, message", [
    (["model.gdn_num_key_heads=6"], "16 value heads are not a multiple of 6 key heads"),
    (["model.gdn_key_head_dim=96"], "model.gdn_key_head_dim=96 does not divide model.hidden_size=512"),
    (["model.hybrid_layer_pattern=G-G-", "parallel.tensor_model_parallel_size=16"],
     "does not divide the Gated DeltaNet key heads=8"),
    (["train.deterministic=true"], "needs data.reset_at_document_boundaries=false"),
])
def test_bad_gdn_configs_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_the_dry_run_describes_gdn_and_the_export_refuses_it(capsys):
    assert main(["pretrain", TINY, "--dry-run", *GDN]) == 0
    out = capsys.readouterr().out
    assert "4 gdn" in out and "4 Gated DeltaNet layers" in out and "Gated DeltaNet state" in out
    from hybrid_megatron.convert.checks import export_problems

    (problem,) = [p for p in export_problems(_cfg().model) if "Gated DeltaNet" in p]
    assert "qwen3_next" in problem and "q/k RMSNorms" in problem
    assert main(["pretrain", TINY, "--dry-run", *GDN, "model.gdn_num_key_heads=6"]) == 2
    assert "not a multiple of 6 key heads" in capsys.readouterr().err


def test_missing_kernels_are_one_line_before_any_model_is_built():
    from megatron.core.ssm.gated_delta_net.common import HAVE_FLA

    from hybrid_megatron.model.build import check_gdn_kernels

    check_gdn_kernels(load_run_config(TINY).model)  # no G layers: nothing to check
    if HAVE_FLA:
        pytest.skip("flash-linear-attention is installed here")
    with pytest.raises(ConfigError, match=r"pip install 'flash-linear-attention~=0.4.0'"):
        check_gdn_kernels(_cfg().model)
