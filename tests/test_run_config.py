"""Run config: YAML + dotlist overrides, validation with one clear line per mistake."""

from __future__ import annotations

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import load_run_config
from hybrid_megatron.config_io import apply_overrides, dump_yaml, to_dict

TINY = "configs/tiny.yaml"


def test_tiny_loads_with_data_path_resolved():
    cfg = load_run_config(TINY)
    assert cfg.model.num_layers == 10
    assert sorted(cfg.data.sources) == ["code", "docs", "tests"]
    assert cfg.data.phases[-1].replay == 0.5


def test_overrides_parse_yaml_scalars_and_reach_nested_sections():
    cfg = load_run_config(TINY, ["optim.lr=3e-4", "train.micro_batch_size=2", "data.seed=7", "model.tie_embeddings=true"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.micro_batch_size == 2 and cfg.data.seed == 7 and cfg.model.tie_embeddings is True


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(TINY, ["optim.lr=1e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert to_dict(load_run_config(path)) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hybrid_layer_pattern=MM*X-"], "unknown symbol 'X' at position 3"),
        (["parallel.tensor_model_parallel_size=3"], "tensor_model_parallel_size=3 does not divide model.num_attention_heads=8"),
        (["parallel.tensor_model_parallel_size=4", "model.mamba_num_groups=2"], "does not divide model.mamba_num_groups=2"),
        (["parallel.pipeline_model_parallel_size=3"], "splits into 2 segments"),
        (["model.hybrid_layer_pattern=M-M*-M-M*-", "parallel.pipeline_model_parallel_size=2"], "has no '|' cuts"),
        (["model.num_query_groups=3"], "num_query_groups=3 does not divide model.num_attention_heads=8"),
        (["optim.lr=-1"], "optim.lr=-1"),
        (["optim.min_lr=1.0"], "optim.min_lr=1.0"),
        (["precision.fp8=e5m2"], "precision.fp8='e5m2': must be one of"),
        (["precision.fp8=hybrid", "precision.fp8_recipe=delayed", "precision.fp8_bf16_layers_at_start=1"], "delayed"),
        (["precision.fp8=hybrid", "precision.fp8_recipe=delayed", "precision.fp8_mamba_projections_bf16=true"],
         "precision.fp8_mamba_projections_bf16=true needs precision.fp8_recipe=tensorwise"),
        (["precision.fp8=hybrid", "data.curriculum=null", "data.seq_len=1000"],
         "precision.fp8 needs sequence lengths that are multiples of 16 (Transformer Engine's FP8 GEMMs): "
         "data.seq_len=1000"),
        (["precision.fp8=hybrid", "data.curriculum.min_seq_len=248"], "data.curriculum.min_seq_len=248"),
        (["precision.fp8=hybrid", "model.ffn_hidden_size=1544"],
         "precision.fp8 needs model.ffn_hidden_size 1544 / TP 1 to be a multiple of 16 (Transformer Engine's FP8 "
         "GEMMs), got 1544"),
        (["precision.fp8=hybrid", "model.kv_channels=33"], "the attention output width 264 / TP 1"),
        (["train.recompute=sometimes"], "train.recompute='sometimes'"),
        (["model.hidden_sise=12"], "unknown config key model.hidden_sise"),
        (["parallel.sequence_parallel=true"], "sequence_parallel=true needs"),
        (["train.micro_batch_size=two"], "train.micro_batch_size='two': expected int"),
        (["optim"], "expected KEY.PATH=VALUE"),
    ],
)
def test_mistakes_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(TINY, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_data_override_swaps_the_data_config_before_data_keys_apply():
    cfg = load_run_config("configs/pretrain_7b.yaml", ["data.seq_len=4096", "data=configs/data/sample.yaml", "data.curriculum=null"])
    assert sorted(cfg.data.sources) == ["code", "docs", "tests"]
    assert cfg.data.seq_len == 4096 and cfg.data.curriculum is None
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(TINY, ["data=configs/data/nope.yaml"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])
