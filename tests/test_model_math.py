"""Pattern splitting, the FLOPs/parameter counter and vocab padding (pure Python)."""

from __future__ import annotations

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import load_run_config
from hybrid_megatron.model import flops, pattern
from hybrid_megatron.model.build import padded_vocab_size


def test_split_stages_follows_megatron_segments():
    stages = pattern.split_stages("M-M*|M-M*|MM|--", 2)
    assert [s.chunks for s in stages] == [("M-M*", "MM"), ("M-M*", "--")]
    assert [s.first_layer for s in stages] == [(0, 8), (4, 10)]
    assert pattern.virtual_pipeline_size("M-M*|M-M*|MM|--", 2) == 2
    assert pattern.split_stages("M-|M*", 1)[0].chunks == ("M-M*",)  # cuts ignored without PP


def test_split_stages_refuses_uneven_segment_counts():
    with pytest.raises(ConfigError, match="splits into 3 segments"):
        pattern.split_stages("MM|M*|--", 2)


def test_tiny_parameter_count_matches_the_built_model():
    # 15,141,568 is what megatron-core's HybridModel built from configs/tiny.yaml holds on an H100
    # (tests/test_gpu_model.py checks the equality on every GPU run, for both layer specs).
    cfg = load_run_config("configs/tiny.yaml")
    assert flops.num_parameters(cfg.model, padded_vocab_size(257, cfg.model, 1)) == 15_141_568


def test_layer_flops_are_twice_the_matmul_params():
    cfg = load_run_config("configs/tiny.yaml")
    m = cfg.model
    mlp = flops.mlp_layer(m)
    assert mlp.flops_per_token == 2 * (mlp.params - m.hidden_size)  # minus the norm weight
    short, long = flops.attention_layer(m, 1024), flops.attention_layer(m, 2048)
    assert long.flops_per_token - short.flops_per_token == 2 * m.num_attention_heads * m.head_dim * 1024
    assert short.params == long.params


def test_swiglu_doubles_the_up_projection():
    relu2 = load_run_config("configs/tiny.yaml").model
    swiglu = load_run_config("configs/tiny.yaml", ["model.activation=swiglu"]).model
    assert flops.mlp_layer(swiglu).params - flops.mlp_layer(relu2).params == relu2.hidden_size * relu2.ffn_hidden_size


def test_stage_parameters_sum_to_the_total_when_untied():
    cfg = load_run_config("configs/tiny.yaml")
    padded = padded_vocab_size(257, cfg.model, 1)
    assert sum(flops.stage_parameters(cfg.model, padded, 2)) == flops.num_parameters(cfg.model, padded)


def test_training_flops_are_three_forwards():
    m = load_run_config("configs/tiny.yaml").model
    assert flops.training_flops_per_token(m, 384, 1024) == 3 * flops.forward_flops_per_token(m, 384, 1024)


def test_vocab_padding_is_independent_of_tp_and_checked():
    m = load_run_config("configs/tiny.yaml").model
    assert padded_vocab_size(257, m, 1) == padded_vocab_size(257, m, 2) == 384
    small = load_run_config("configs/tiny.yaml", ["model.make_vocab_size_divisible_by=7"]).model
    with pytest.raises(ConfigError, match="does not divide the padded vocabulary"):
        padded_vocab_size(257, small, 2)


@pytest.mark.parametrize("pp,pattern_,interleaved", [(2, "M-M|*-M|-M|*-", True), (2, "M-M*-M-|M*-", False),
                                                      (1, "M-M*-M-M*-", False)])
def test_interleaved_pipelines_overlap_their_p2p_unbatched(pp, pattern_, interleaved):
    """At PP=2 a rank's previous and next stage are one rank: batched p2p (megatron-core's default) puts two
    sends and two receives between the same pair in one batch, which the interleaved schedule then pairs
    with the wrong micro-batches. The interleaved schedule gets Megatron-LM's overlapped, unbatched p2p;
    the others keep megatron-core's defaults (the 1F1B schedule refuses overlap_p2p_comm)."""
    from hybrid_megatron.model.build import build_transformer_config

    cfg = load_run_config("configs/tiny.yaml", [f"parallel.pipeline_model_parallel_size={pp}",
                                                f"model.hybrid_layer_pattern={pattern_}"])
    config = build_transformer_config(cfg)
    assert (config.virtual_pipeline_model_parallel_size is not None) is interleaved
    assert (config.overlap_p2p_comm, config.batch_p2p_comm) == ((True, False) if interleaved else (False, True))
