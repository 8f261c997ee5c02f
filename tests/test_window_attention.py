"""Sliding-window attention with global layers: the config, what megatron is told, FLOPs, the inference
cache the dry run prints, and the export's refusal."""

from __future__ import annotations

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.model import flops, inference_cache
from hybrid_megatron.model.build import window_kwargs

TINY = "configs/tiny.yaml"  # M-M*-|M-M*-: attention layers at pattern positions 3 and 8


def _tiny(*overrides):
    return load_run_config(TINY, list(overrides))


def test_megatron_windows_exactly_the_non_global_attention_layers():
    from megatron.core.transformer.utils import is_layer_window_attention

    pattern = "*M*-M*-M*-"  # attention layers at positions 0, 2, 5, 8
    cfg = _tiny(f"model.hybrid_layer_pattern={pattern}", "model.attention_window=128",
                "model.global_attention_layers=[0,3]")
    kw = window_kwargs(cfg.model)
    assert kw["window_size"] == (127, 0)
    windowed = [is_layer_window_attention(kw["window_size"], kw["window_attn_skip_freq"], i + 1)
                for i in range(len(pattern))]
    assert [i for i, w in enumerate(windowed) if w] == [2, 5]  # the 2nd and 3rd attention layers
    assert window_kwargs(_tiny().model) == {}
    from hybrid_megatron.model.build import build_transformer_config

    config = build_transformer_config(cfg)  # megatron's own TransformerConfig accepts them
    assert config.window_size == (127, 0) and config.window_attn_skip_freq == kw["window_attn_skip_freq"]


@pytest.mark.parametrize("overrides, message", [
    (["model.global_attention_layers=[0]"], "needs model.attention_window"),
    (["model.attention_window=0"], "model.attention_window"),
    (["model.attention_window=64", "model.global_attention_layers=[2]"], "must be distinct and in [0, 2)"),
    (["model.attention_window=64", "model.global_attention_layers=[1,1]"], "must be distinct"),
    (["model.attention_window=64", "model.hybrid_layer_pattern=M-M-"], "the pattern has no attention layer"),
    (["model.attention_window=64", "model.layer_spec=local"], "needs Transformer Engine's attention"),
    (["model.attention_window=1024"], "is not below the longest training sequence (1024 tokens)"),
])
def test_bad_windows_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _tiny(*overrides)


def test_a_window_cuts_attention_flops_to_its_mean_keys():
    assert flops.mean_keys(1024, None) == flops.mean_keys(1024, 2048) == 512
    assert flops.mean_keys(1024, 256) == 256 - 256 * 256 / 2048
    full, windowed = _tiny().model, _tiny("model.attention_window=256").model
    per_layer = 4 * full.num_attention_heads * full.head_dim
    saved = 2 * per_layer * (512 - flops.mean_keys(1024, 256))  # two attention layers
    assert flops.forward_flops_per_token(full, 384, 1024) - flops.forward_flops_per_token(windowed, 384, 1024) == \
        pytest.approx(saved, abs=2)
    assert flops.forward_flops_per_token(windowed, 384, 128) == flops.forward_flops_per_token(full, 384, 128)


def test_the_inference_cache_counts_kv_per_context_and_a_constant_mamba_state():
    m = _tiny().model
    assert inference_cache.kv_bytes_per_token(m) == 2 * 4 * 64 * 2
    assert inference_cache.mamba_state_bytes(m) == (1024 * 64 + (1024 + 2 * 2 * 64) * 3) * 2
    c = inference_cache.cache_bytes(m, 32768)
    assert c.attention == 2 * 32768 * 1024 and c.mamba == 4 * 138752
    half = inference_cache.cache_bytes(_tiny("model.attention_window=256", "model.global_attention_layers=[1]").model,
                                       32768)
    assert half.attention == (32768 + 256) * 1024 and half.mamba == c.mamba


def test_the_dry_run_prints_the_cache_and_the_export_refuses_a_window(capsys):
    assert main(["pretrain", TINY, "--dry-run", "model.attention_window=256"]) == 0
    out = capsys.readouterr().out
    assert "# inference cache per sequence" in out and "(2 with a 256-token window)" in out
    assert "constant past 256 tokens (no full-attention layer)" in out
    from hybrid_megatron.convert.checks import export_problems

    assert any("no sliding window" in p for p in export_problems(_tiny("model.attention_window=256").model))
    assert main(["pretrain", TINY, "--dry-run", "model.attention_window=4096"]) == 2
    assert "is not below the longest training sequence" in capsys.readouterr().err
