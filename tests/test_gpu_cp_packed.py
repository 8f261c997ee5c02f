"""GPU: packed documents under context parallelism. Rows of documents padded to a multiple of 2 x CP
(data.document_multiple), flattened into megatron's thd layout as the training step does, and split by
``training/step.cp_share`` (megatron's per-document split through Transformer Engine's
``thd_get_partitioned_indices``): each CP rank holds chunks r and 2 x CP - 1 - r of every document, in document
order, for every per-token tensor, and its PackedSeqParams are the whole micro-batch's with the padded lengths
set. Two CP ranks share the one GPU over gloo."""

from __future__ import annotations

import numpy as np
import pytest

from gloo_world import run_ranks

pytestmark = pytest.mark.gpu

EOS = 0


def _body(rank: int, out) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from data_pipeline.packing import build_arrays, take_dropped
    from data_pipeline.loader import StepBatch
    from hybrid_megatron.training.step import cp_share, split_micro_batches

    torch.cuda.set_device(0)
    rng = np.random.default_rng(0)
    windows = rng.integers(1, 200, size=(2, 257))
    windows[rng.random(windows.shape) < 0.03] = EOS
    arrays = build_arrays(windows, EOS, True, False, document_multiple=4)
    batch = StepBatch(step=0, phase="p", seq_len=256, sources=["s", "s"], hashes=["", ""], tokens_by_source={},
                      dropped_tokens=take_dropped(arrays), **arrays)
    (mb,) = split_micro_batches(batch, 2, True, torch.device("cuda"))
    share = cp_share(mb, ps.get_context_parallel_group())
    cu = mb.packed_seq_params.cu_seqlens_q.tolist()
    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    want = []
    for a, b in zip(cu[:-1], cu[1:]):
        chunk = (b - a) // (2 * cp)
        want += list(range(a + r * chunk, a + (r + 1) * chunk)) + list(range(b - (r + 1) * chunk, b - r * chunk))
    flat = {k: getattr(mb, k).reshape(-1) for k in ("input_ids", "labels", "loss_mask", "position_ids")}
    out[rank] = {
        "same": {k: bool(torch.equal(getattr(share, k).reshape(-1).cpu(), v[want].cpu())) for k, v in flat.items()},
        "padded": share.packed_seq_params.cu_seqlens_q_padded.tolist() == cu,
        "documents": len(cu) - 1, "tokens": len(want),
    }


def test_each_cp_rank_holds_its_zigzag_chunks_of_every_padded_document():
    for rank, r in run_ranks(_body, world=2, cp=2).items():
        assert r["documents"] > 10 and r["tokens"] == 256, r  # 512 tokens over two ranks
        assert all(r["same"].values()) and r["padded"], (rank, r)
