"""Recall items through the megatron forward: is each answer the model's top prediction, with the whole
model or with a memory cut? The ``mqar`` and ``state`` suites are built on this.

Items are MQAR items (``data_pipeline.synthetic``) generated for the cell asked for (key-value pairs x
sequence length) from a seed the training source did not use. One item is one row: the item's tokens and
one PAD, so that inputs are the item and labels the item shifted by one; the answers are the labels under
the item's loss mask. Rows are split over DP ranks in contiguous slices and the outcomes gathered back in
item order, so the result is the same at every layout. An answer is right when the argmax over the whole
vocabulary (gathered over TP, padding rows excluded) equals it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from data_pipeline.loader import StepBatch
from data_pipeline.packing import build_arrays
from data_pipeline.synthetic import MqarOptions, item


@dataclass(frozen=True)
class Cell:
    pairs: int
    seq_len: int
    tokens: np.ndarray  # [items, seq_len]
    masks: np.ndarray  # [items, seq_len] uint8, 1 on answers
    query_start: int  # position of the first query (the same in every item of a cell)

    @property
    def fingerprint(self) -> str:
        """Which items these are (their tokens and answer masks): two runs' outcomes pair item by item only
        where it is the same (``compare``)."""
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self.tokens, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.masks, dtype=np.uint8).tobytes())
        return digest.hexdigest()[:16]


def mqar_cell(base: MqarOptions, pairs: int, seq_len: int, items: int, seed: int) -> Cell:
    opts = MqarOptions(num_kv_pairs=(pairs,), seq_len=seq_len, vocab=base.vocab, docs=items, seed=seed)
    opts.check()
    tokens = np.empty((items, seq_len), np.int64)
    masks = np.empty((items, seq_len), np.uint8)
    for i in range(items):
        tokens[i], masks[i], _ = item(opts, i)
    return Cell(pairs, seq_len, tokens, masks, seq_len - 1 - 2 * pairs)


def item_batch(cell: Cell, rows: slice, pad_id: int, eos_id: int) -> StepBatch:
    """Rows ``rows`` of the cell as a StepBatch of windows (item + PAD), documents reset at every item."""
    tokens, masks = cell.tokens[rows], cell.masks[rows]
    n = tokens.shape[0]
    windows = np.concatenate([tokens, np.full((n, 1), pad_id, np.int64)], axis=1)
    targets = np.concatenate([masks, np.zeros((n, 1), np.uint8)], axis=1)
    arrays = build_arrays(windows, eos_id, True, False, targets)
    return StepBatch(step=-1, phase="recall", seq_len=cell.seq_len, sources=["mqar"] * n, hashes=[""] * n,
                     tokens_by_source={"mqar": n * cell.seq_len}, **arrays)


def cut_rows(batch: StepBatch, position: int) -> StepBatch:
    """The batch with a document boundary at ``position`` of every row (for the layers given these rows)."""
    import dataclasses

    from hybrid_megatron.eval.cuts import cut_seq_idx

    n = batch.input_ids.shape[0]
    return dataclasses.replace(batch, seq_idx=cut_seq_idx(batch.seq_idx, np.full(n, position)))


def vocab_parallel_argmax(logits, vocab_size: int):
    """Argmax over the vocabulary of vocab-parallel logits [..., vocab / TP] (rows >= vocab_size excluded):
    the lowest id among equal maxima, as torch.argmax on the gathered logits would give."""
    import torch
    from megatron.core import parallel_state

    part = logits.shape[-1]
    rank = parallel_state.get_tensor_model_parallel_rank()
    ids = torch.arange(rank * part, (rank + 1) * part, device=logits.device)
    masked = logits.float().masked_fill(ids >= vocab_size, float("-inf"))
    best, idx = masked.max(dim=-1)
    idx = idx + rank * part
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return idx
    group = parallel_state.get_tensor_model_parallel_group()
    bests, idxs = [torch.empty_like(best) for _ in range(tp)], [torch.empty_like(idx) for _ in range(tp)]
    torch.distributed.all_gather(bests, best, group=group)
    torch.distributed.all_gather(idxs, idx, group=group)
    winner = torch.stack(bests).argmax(dim=0)  # first (lowest-id) shard among equal maxima
    return torch.stack(idxs).gather(0, winner.unsqueeze(0)).squeeze(0)


def _answers(vocab_size: int, seq_len: int, pairs: int, mb):
    return partial(answer_check, mb.labels, mb.loss_mask, vocab_size, seq_len, pairs)


def answer_check(labels, loss_mask, vocab_size: int, seq_len: int, pairs: int, logits):
    """The loss function of the recall suites: per row, whether each answer is the top prediction."""
    import torch

    pred = vocab_parallel_argmax(logits, vocab_size).reshape(-1, seq_len)
    mask = loss_mask.reshape(-1, seq_len) > 0
    right = (pred == labels.reshape(-1, seq_len))[mask].reshape(-1, pairs)  # every row has `pairs` answers
    zero = torch.zeros((), device=logits.device)
    return zero, mask.sum().to(torch.int), {"answers": right.double()}


def answers_right(chunks, cfg, cell: Cell, vocab_size: int, pad_id: int, eos_id: int, max_seq_len: int,
                  cut: dict[str, int] | None = None) -> np.ndarray:
    """[items, pairs] bool: each answer right or not, under ``cut`` ({"mamba"/"gdn"/"attention": p}:
    those layers see a document start at position p of every item), the same on every rank."""
    import torch
    from megatron.core import parallel_state

    from hybrid_megatron.eval.sharding import dp_share
    from hybrid_megatron.training.step import from_last_stage, plan_micro_batches, schedule

    share = dp_share(cell.tokens.shape[0])
    batch = item_batch(cell, share, pad_id, eos_id)
    mbs, micro = plan_micro_batches(batch, chunks, cfg, max_seq_len)
    for kind, position in (cut or {}).items():
        _, cut_micro = plan_micro_batches(cut_rows(batch, position), chunks, cfg, max_seq_len)
        for mb, other in zip(micro, cut_micro):
            mb.layer_params = {**(mb.layer_params or {}), kind: other.packed_seq_params}
    with torch.no_grad():
        reports = schedule(micro, mbs, cell.seq_len, chunks, cfg, forward_only=True,
                           loss_of=partial(_answers, vocab_size, cell.seq_len, cell.pairs), logits=True)
    rows = from_last_stage(reports, "answers", (share.stop - share.start, cell.pairs))
    gathered = [torch.zeros_like(rows) for _ in range(parallel_state.get_data_parallel_world_size())]
    torch.distributed.all_gather(gathered, rows, group=parallel_state.get_data_parallel_group())
    return torch.cat(gathered).cpu().numpy() > 0.5
