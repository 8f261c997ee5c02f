"""Conversion mapping and export refusals: pure tensor maps and config checks, no checkpoint I/O."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import ModelConfig
from hybrid_megatron.config_io import build
from hybrid_megatron.convert import checks, mapping
from hybrid_megatron.convert.hf_config import model_config_from_hf, to_hf_config
from hybrid_megatron.convert.testing import tiny_hf_config


def _cfg(**overrides) -> ModelConfig:
    return model_config_from_hf(tiny_hf_config(**overrides))


def _group(groups, hf_suffix):
    return next(g for g in groups if any(k.endswith(hf_suffix) for k in g.hf_keys))


def test_qkv_rows_are_grouped_per_query_group():
    cfg = _cfg()  # 4 query heads, 2 groups, head dim 16
    d = mapping.Dims.of(cfg)
    group = _group(mapping.model_groups(cfg), "q_proj.weight")
    # label each megatron row by (group, slot) where slots 0-1 are q heads, 2 is k, 3 is v
    rows = torch.arange(d.kv_heads * 4).repeat_interleave(d.head_dim).float()
    qkv = rows[:, None].expand(-1, d.hidden).contiguous()
    q, k, v = group.to_hf([qkv])
    assert q[:, 0].unique(sorted=False).tolist() == [0.0, 1.0, 4.0, 5.0]  # q heads of group 0 then of group 1
    assert k[:, 0].unique(sorted=False).tolist() == [2.0, 6.0]
    assert v[:, 0].unique(sorted=False).tolist() == [3.0, 7.0]
    (back,) = group.to_megatron([q, k, v])
    assert torch.equal(back, qkv)


def test_every_group_round_trips_exactly():
    cfg = _cfg()
    shapes = mapping.expected_megatron_shapes(cfg, padded_vocab=256)
    groups = mapping.model_groups(cfg)
    assert sorted(k for g in groups for k in g.meg_keys) == sorted(shapes)
    for group in groups:
        meg = [torch.randn(shapes[k]) for k in group.meg_keys]
        hf = group.to_hf(meg)
        assert len(hf) == len(group.hf_keys)
        back = group.to_megatron(hf)
        assert all(torch.equal(a, b) for a, b in zip(meg, back)), group.meg_keys


def test_in_proj_is_concatenated_component_wise():
    cfg = _cfg()
    d = mapping.Dims.of(cfg)
    group = _group(mapping.model_groups(cfg), "mixer.in_proj.weight")
    parts = [torch.full((n, d.hidden), float(i)) for i, n in enumerate(d.in_proj_sizes)]
    (full,) = group.to_hf(parts)
    bounds = torch.tensor(d.in_proj_sizes).cumsum(0).tolist()
    assert full[:, 0].tolist() == [float(i) for i, n in enumerate(d.in_proj_sizes) for _ in range(n)]
    assert full.shape[0] == bounds[-1] == 2 * cfg.mamba_d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim + cfg.num_mamba_heads


def test_hf_config_round_trips_model_section():
    cfg = _cfg()
    hf = to_hf_config(cfg, vocab_size=250, dtype="bf16")
    assert hf["hybrid_override_pattern"] == "M*-M-*M-" and hf["num_hidden_layers"] == 8
    assert hf["time_step_min"] < 1e-37 and hf["time_step_limit"] == [0.0, float("inf")]
    assert not hf["tie_word_embeddings"] and hf["mlp_hidden_act"] == "relu2" and not hf["attention_bias"]
    assert model_config_from_hf(hf) == cfg


def test_hf_config_loads_in_transformers():
    from transformers import NemotronHConfig

    hf = NemotronHConfig(**to_hf_config(_cfg(), vocab_size=250, dtype="fp32"))
    assert hf.hybrid_override_pattern == "M*-M-*M-"
    assert hf.num_key_value_heads == 2 and hf.n_groups == 2 and hf.chunk_size == 16


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ({"position_embedding_type": "rope"}, "position_embedding_type=rope: NemotronH has no RoPE"),
        ({"activation": "swiglu"}, "activation=swiglu (gated): NemotronH's MLP is non-gated relu2"),
        ({"normalization": "LayerNorm"}, "normalization=LayerNorm: NemotronH uses RMSNorm"),
        ({"add_bias_linear": True}, "add_bias_linear=true: NemotronH's linear layers have no bias"),
        ({"tie_embeddings": True}, "tie_embeddings=true"),
        ({"norm_epsilon": 1e-6}, "norm_epsilon=1e-06: NemotronH uses one epsilon"),
    ],
)
def test_export_refusals_name_the_option(override, line):
    raw = {"hybrid_layer_pattern": "M*-", "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
           "mamba_head_dim": 16, "mamba_num_groups": 2, **override}
    with pytest.raises(ConfigError) as exc:
        checks.check_exportable(build(ModelConfig, raw))
    assert line in str(exc.value) and "\n" not in str(exc.value)


def test_import_refuses_biases_and_moe_routing_megatron_cannot_compute():
    problems = checks.import_problems(tiny_hf_config(hybrid_override_pattern="M*-", mlp_bias=True))
    assert any(p.startswith("mlp_bias=True") for p in problems)
    moe = dict(hybrid_override_pattern="M*E", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=32)
    assert checks.import_problems(tiny_hf_config(**moe)) == []
    problems = checks.import_problems(tiny_hf_config(**{**moe, "n_group": 2, "norm_topk_prob": False}))
    assert [p.split("=")[0] for p in problems] == ["n_group", "norm_topk_prob"]
    with pytest.raises(ConfigError, match="model_type='llama'"):
        checks.check_importable({"model_type": "llama"})
