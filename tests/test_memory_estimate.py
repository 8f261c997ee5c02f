"""The per-GPU memory estimate (hybrid_megatron/model/memory.py): accounting identities, monotonicity,
and one anchor measured on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import load_run_config
from hybrid_megatron.model import flops, memory

ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 384  # the bytes tokenizer's 257 ids padded to a multiple of 128


def _tiny(*overrides: str):
    return load_run_config(ROOT / "configs/tiny.yaml", list(overrides))


def _total(cfg, seq_len=1024, world_size=8) -> float:
    return max(st.total for st in memory.estimate(cfg, TINY_VOCAB, seq_len, world_size=world_size))


def test_tiny_estimate_is_near_the_memory_measured_on_an_h100():
    # benchmarks/results/tiny_h100.json: configs/tiny.yaml on one H100 (TP=PP=DP=1, micro-batch 8 x 1024
    # tokens packed as thd, TE spec, bf16, distributed optimizer) logged torch.cuda.max_memory_allocated()
    # = 1.2 GiB. That counter sees the allocator's tensors only, so compare the modelled tensors, not the
    # fixed CUDA-context/NCCL overhead.
    record = json.loads((ROOT / "benchmarks/results/tiny_h100.json").read_text())
    measured = record["result"]["max_memory_allocated_gib"] * 2**30
    assert record["config"]["micro_batch_size_at_1024"] == 8 and record["config"]["layer_spec"] == "te"
    (stage,) = memory.estimate(_tiny(), TINY_VOCAB, 1024, world_size=1)
    assert 0.5 * measured <= stage.allocated <= 2 * measured


def test_states_match_the_exact_parameter_count_per_stage():
    cfg = _tiny("precision.fp32_ssm_params=false", "parallel.pipeline_model_parallel_size=2")
    per_stage = flops.stage_parameters(cfg.model, TINY_VOCAB, 2)
    stages = memory.estimate(cfg, TINY_VOCAB, 1024, world_size=2)
    assert [st.weights for st in stages] == [2 * n for n in per_stage]  # bf16
    assert [st.grads for st in stages] == [4 * n for n in per_stage]  # fp32 grad buffer
    assert [st.optimizer for st in stages] == [12 * n for n in per_stage]  # DP 1: nothing to shard over


def test_fp32_ssm_params_cost_two_more_bytes_each():
    bf16, fp32 = (memory.estimate(_tiny(f"precision.fp32_ssm_params={v}"), TINY_VOCAB, 1024, world_size=1)[0]
                  for v in ("false", "true"))
    cfg = _tiny()
    n_ssm = 3 * cfg.model.num_mamba_heads * cfg.model.hybrid_layer_pattern.count("M")
    assert fp32.weights - bf16.weights == 2 * n_ssm
    assert bf16.optimizer - fp32.optimizer == 4 * n_ssm  # an fp32 param is its own master copy


def test_tensor_parallel_shards_all_but_the_replicated_norms():
    one = memory.estimate(_tiny(), TINY_VOCAB, 1024, world_size=1)[0]
    two = memory.estimate(_tiny("parallel.tensor_model_parallel_size=2"), TINY_VOCAB, 1024, world_size=2)[0]
    m = _tiny().model
    replicated = m.hidden_size * (m.num_layers + 1)  # one RMSNorm weight per layer + the final norm
    assert two.grads == pytest.approx(4 * ((one.grads / 4 - replicated) / 2 + replicated))


def test_distributed_optimizer_divides_only_the_optimizer_term_by_dp():
    cfg = _tiny()
    dp1 = memory.estimate(cfg, TINY_VOCAB, 1024, world_size=1)[0]
    dp4 = memory.estimate(cfg, TINY_VOCAB, 1024, world_size=4)[0]
    assert dp4.optimizer == pytest.approx(dp1.optimizer / 4)
    assert (dp4.weights, dp4.grads, dp4.activations) == (dp1.weights, dp1.grads, dp1.activations)
    plain = _tiny("parallel.use_distributed_optimizer=false")
    assert memory.estimate(plain, TINY_VOCAB, 1024, world_size=4)[0].optimizer == dp1.optimizer


def test_estimate_grows_with_sequence_length_and_micro_batch():
    cfg = _tiny()
    assert _total(cfg, seq_len=2048) > _total(cfg, seq_len=1024) > _total(cfg, seq_len=512)
    assert _total(_tiny("train.micro_batch_size=16")) > _total(cfg) > _total(_tiny("train.micro_batch_size=2"))


def test_full_recompute_below_selective_below_none():
    full, selective, none = (_total(_tiny(f"train.recompute={r}")) for r in ("full", "selective", "none"))
    assert full < selective < none


def test_stage_zero_of_a_pipeline_holds_pp_micro_batches():
    assert [memory.in_flight(4, 1, r, 64) for r in range(4)] == [4, 3, 2, 1]
    assert memory.in_flight(4, 1, 0, 2) == 2  # fewer micro-batches than stages
    assert memory.in_flight(4, 2, 0, 64) == 2 * 3 + 4 + 1  # interleaved: megatron's warm-up + 1
    assert memory.in_flight(1, 1, 0, 64) == 1


def test_fp8_weight_copies_skip_the_bf16_layers():
    cfg = _tiny("precision.fp8=hybrid")
    assert memory.estimate(cfg, TINY_VOCAB, 1024, world_size=1)[0].fp8_weights > 0
    all_bf16 = _tiny("precision.fp8=hybrid", "precision.fp8_bf16_layers_at_start=10")
    assert memory.estimate(all_bf16, TINY_VOCAB, 1024, world_size=1)[0].fp8_weights == 0


def test_world_size_must_be_a_multiple_of_tp_times_pp():
    cfg = _tiny("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    assert memory.data_parallel_size(cfg, 8) == 2
    with pytest.raises(ConfigError, match=r"--gpus 6: must be a positive multiple of TP 2 x PP 2 = 4"):
        memory.data_parallel_size(cfg, 6)


def test_lines_name_every_term_and_a_verdict():
    lines = memory.estimate_lines(_tiny(), TINY_VOCAB, 1024, world_size=8)
    assert lines[0].startswith("8 GPUs = TP 1 x PP 1 x DP 8;")
    for term in ("weights", "grads", "optimizer", "(recompute=none, mbs 8, seq 1024", "total"):
        assert term in lines[1]
    assert lines[-2].startswith("worst: pp stage 0, total") and "fits an 80 GB H100" in lines[-2]
    assert lines[-1].startswith("activations by layer on pp stage 0, per micro-batch: mamba 4 x ")


def test_the_breakdown_by_layer_is_what_each_layer_of_the_stage_keeps():
    """Pipeline stage 1 of the tiny pattern (M-M*- | M-M*-) holds 2 Mamba, 2 MLP and 1 attention layer; each entry
    is memory.layer_activations' bytes for one micro-batch of that stage's layers."""
    cfg = _tiny("parallel.pipeline_model_parallel_size=2")
    stages = memory.estimate(cfg, TINY_VOCAB, 1024, world_size=2)
    T = cfg.train.micro_batch_size * 1024
    for st in stages:
        assert {sym: n for sym, n, _ in st.kept_by_layer} == {"M": 2, "-": 2, "*": 1}
        for sym, _, kept in st.kept_by_layer:
            assert kept == memory.layer_activations(cfg.model, sym, T, 1, 1, cfg.train.recompute)[0]
    lines = memory.estimate_lines(cfg, TINY_VOCAB, 1024, world_size=2)
    worst = max(stages, key=lambda st: st.total)
    assert lines[-1].startswith(f"activations by layer on pp stage {worst.pp_rank}, per micro-batch: mamba 2 x ")
    full = memory.estimate_lines(_tiny("train.recompute=full"), TINY_VOCAB, 1024, world_size=1)
    assert full[-1].endswith("(what each layer would keep without recompute; recompute=full keeps only the "
                             "layers' inputs)")
