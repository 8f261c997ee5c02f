"""How a step's batch becomes megatron micro-batches (training/step.py), on a CPU: token-constant
micro-batch sizes, the packed ``thd`` layout with document boundaries, and the per-token loss sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.errors import ConfigError
from data_pipeline.loader import StepBatch
from data_pipeline.packing import build_arrays
from hybrid_megatron.training.step import loss_func, micro_batch_size_for, split_micro_batches

EOS = 9


def _batch(n: int, seq: int, eos_at: dict[int, list[int]] | None = None) -> StepBatch:
    windows = (np.arange(n * (seq + 1)).reshape(n, seq + 1) % 8).astype(np.int64)  # ids 0..7, no EOS
    for row, cols in (eos_at or {}).items():
        windows[row, cols] = EOS
    arrays = build_arrays(windows, EOS, reset=True, eod_mask_loss=False)
    return StepBatch(step=0, phase="pretrain", seq_len=seq, sources=["s"] * n, hashes=[""] * n,
                     tokens_by_source={"s": n * seq}, **arrays)


@pytest.mark.parametrize("n_local, seq, mbs, max_seq, want", [
    (128, 256, 8, 1024, 32),   # a quarter of the length: four times the sequences, same tokens
    (32, 1024, 8, 1024, 8),
    (12, 1024, 8, 1024, 6),    # the largest divisor of 12 not above 8
    (7, 1024, 2, 1024, 1),     # a prime count: one sequence at a time
    (4, 256, 8, 1024, 4),      # never more than this rank holds
])
def test_micro_batches_hold_a_constant_number_of_tokens(n_local, seq, mbs, max_seq, want):
    got = micro_batch_size_for(n_local, seq, mbs, max_seq)
    assert got == want and n_local % got == 0


def test_interleaved_pipelines_get_a_multiple_of_pp_micro_batches():
    assert micro_batch_size_for(12, 1024, 8, 1024, microbatches_multiple_of=4) == 3  # 4 micro-batches, not 2
    assert micro_batch_size_for(32, 1024, 8, 1024, microbatches_multiple_of=2) == 8
    with pytest.raises(ConfigError, match="cannot form a number of micro-batches divisible by 4"):
        micro_batch_size_for(6, 1024, 8, 1024, microbatches_multiple_of=4)


def test_packed_micro_batches_flatten_rows_and_mark_every_document_start():
    batch = _batch(4, 10, eos_at={0: [3], 2: [5, 7]})
    micro = split_micro_batches(batch, 2, packed=True, device="cpu")
    assert len(micro) == 2
    first, second = micro
    assert first.input_ids.shape == (1, 20) and first.labels.shape == (1, 20)
    assert torch.equal(first.input_ids[0], torch.from_numpy(batch.input_ids[:2].reshape(-1)))
    assert torch.equal(second.position_ids[0], torch.from_numpy(batch.position_ids[2:].reshape(-1)))
    # row 0 has a document starting after its EOS (input index 3 -> next doc at 4); each row starts one
    p = first.packed_seq_params
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == [0, 4, 10, 20] and p.max_seqlen_q == 10 and p.total_tokens == 20
    assert second.packed_seq_params.cu_seqlens_q.tolist() == [0, 6, 8, 10, 20]
    assert second.packed_seq_params.max_seqlen_kv == 10
    assert first.loss_mask.dtype == torch.float32


def test_unpacked_micro_batches_keep_rows():
    batch = _batch(6, 8)
    micro = split_micro_batches(batch, 3, packed=False, device="cpu")
    assert [m.input_ids.shape for m in micro] == [(3, 8), (3, 8)]
    assert all(m.packed_seq_params is None for m in micro)
    assert torch.equal(torch.cat([m.labels for m in micro]), torch.from_numpy(batch.labels))


def test_loss_is_a_masked_token_sum_with_its_token_count():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    loss_sum, tokens, report = loss_func(mask, losses)
    assert loss_sum.item() == 1 + 3 + 4 + 5 and loss_sum.dtype == torch.float32
    assert tokens.item() == 4 and tokens.dtype == torch.int32
    assert report["lm loss"].tolist() == [13.0, 4.0]


def test_micro_batch_plan_covers_every_sequence_length_and_fails_early():
    from data_pipeline.schedule import build_schedule
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.training.step import micro_batch_plan

    cfg = load_run_config("configs/tiny.yaml")
    schedule = build_schedule(cfg.data)
    plan = micro_batch_plan(cfg, schedule, dp_size=1)
    assert sorted(plan) == sorted({seq for seq, _ in schedule.shapes()})
    for seq, (mbs, n) in plan.items():
        assert mbs * seq <= cfg.train.micro_batch_size * 1024  # never more tokens than the configured micro-batch
    assert plan[1024] == (8, 4)
    bad = load_run_config("configs/tiny.yaml", ["model.hybrid_layer_pattern=M-M|*-M|-M|*-",
                                                "parallel.pipeline_model_parallel_size=2", "data.curriculum=null",
                                                "data.global_batch_tokens=3072", "data.batch_size_multiple=1"])
    with pytest.raises(ConfigError, match="3 sequences of 1024 tokens per data-parallel rank cannot form"):
        micro_batch_plan(bad, build_schedule(bad.data), dp_size=1)
