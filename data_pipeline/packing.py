"""From token windows to model inputs: labels, loss mask, position ids and seq_idx at document bounds.

Shapes: ``N`` sequences of this rank, ``L`` sequence length. A window holds ``L + 1`` tokens; inputs are
the first ``L``, labels the last ``L``. A document starts at position 0 of a row and after every EOS
input token. With ``reset_at_document_boundaries``, ``position_ids`` restart at 0 at each document
start and ``seq_idx`` counts documents within the row (0,0,0,1,1,2,...): Mamba-2 kernels take
``seq_idx`` to reset the SSM state, and attention derives ``cu_seqlens`` from it (see
:func:`cu_seqlens`). Without it, ``position_ids`` is ``arange(L)`` and ``seq_idx`` is zero.
"""

from __future__ import annotations

import hashlib

import numpy as np


def build_arrays(windows_NL1: np.ndarray, eos_id: int, reset: bool, eod_mask_loss: bool,
                 targets_NL1: np.ndarray | None = None, document_multiple: int = 1) -> dict[str, np.ndarray]:
    """Model inputs for windows ``[N, L+1]`` (int64). ``targets_NL1``: the sources' loss-mask channel for the
    same tokens (1: train on the token as a label); a label outside it is not trained. ``document_multiple`` > 1
    (with ``reset``): every document of a row padded to a multiple of it (``pad_documents``)."""
    n, l1 = windows_NL1.shape
    seq_len = l1 - 1
    input_ids = np.ascontiguousarray(windows_NL1[:, :-1])
    labels = np.ascontiguousarray(windows_NL1[:, 1:])
    loss_mask = np.ones((n, seq_len), np.float32) if targets_NL1 is None else targets_NL1[:, 1:].astype(np.float32)
    if eod_mask_loss:
        loss_mask[input_ids == eos_id] = 0.0
    if reset:
        starts = np.zeros((n, seq_len), bool)
        starts[:, 1:] = input_ids[:, :-1] == eos_id
        seq_idx = np.cumsum(starts, axis=1, dtype=np.int32)
        idx = np.arange(seq_len, dtype=np.int64)
        last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
        position_ids = idx[None, :] - last_start
    else:
        seq_idx = np.zeros((n, seq_len), np.int32)
        position_ids = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (n, seq_len)).copy()
    arrays = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
              "seq_idx": seq_idx}
    if document_multiple > 1:
        if not reset:
            raise ValueError("padding documents needs reset_at_document_boundaries (rows as documents)")
        return pad_documents(arrays, document_multiple, eos_id)
    return arrays


def pad_documents(arrays: dict[str, np.ndarray], multiple: int, pad_id: int) -> dict[str, np.ndarray]:
    """Every document of each row moved to start at a multiple of ``multiple`` (so each spans a multiple of it,
    what context parallelism's per-document split needs), with pad tokens after it: input and label ``pad_id``,
    loss mask 0, positions and document id continuing the document's. A row keeps its length, so the padding
    pushes the row's last tokens out: ``dropped_tokens`` [N] counts them (they are not trained; at most
    ``multiple - 1`` per document boundary in the row). Every token kept has the input, label, loss mask, position
    and document it had."""
    seq_idx = arrays["seq_idx"]
    n, length = seq_idx.shape
    if length % multiple:
        raise ValueError(f"rows of {length} tokens do not hold whole documents padded to a multiple of {multiple}")
    out = {"input_ids": np.full((n, length), pad_id, np.int64), "labels": np.full((n, length), pad_id, np.int64),
           "loss_mask": np.zeros((n, length), np.float32), "position_ids": np.empty((n, length), np.int64),
           "seq_idx": np.empty((n, length), np.int32), "dropped_tokens": np.zeros(n, np.int64)}
    idx = np.arange(length)
    for r in range(n):
        starts = np.flatnonzero(np.r_[True, seq_idx[r, 1:] != seq_idx[r, :-1]])
        lengths = np.diff(np.r_[starts, length])
        padded = -(-lengths // multiple) * multiple
        new_starts = np.r_[0, np.cumsum(padded)[:-1]]
        target = idx + np.repeat(new_starts - starts, lengths)  # where each token goes
        keep = target < length
        for key in ("input_ids", "labels", "loss_mask"):
            out[key][r, target[keep]] = arrays[key][r, keep]
        span_start = np.repeat(new_starts, padded)[:length]
        out["position_ids"][r] = idx - span_start
        out["seq_idx"][r] = np.repeat(seq_idx[r, starts], padded)[:length]
        out["dropped_tokens"][r] = length - int(keep.sum())
    return out


def take_dropped(arrays: dict) -> int:
    """Removes ``pad_documents``' per-row count from ``build_arrays``' output and returns its total (0 when the
    documents were not padded), leaving the per-token arrays a StepBatch takes."""
    return int(arrays.pop("dropped_tokens", np.zeros(0, np.int64)).sum())


def sample_hash(window: np.ndarray) -> str:
    """Identity of a sample's token content (all ``L + 1`` tokens, as uint32), independent of dtype."""
    return hashlib.blake2b(np.ascontiguousarray(window, dtype="<u4").tobytes(), digest_size=8).hexdigest()


def cu_seqlens(seq_idx_NL: np.ndarray) -> np.ndarray:
    """Cumulative document lengths over the flattened batch (int32, starts with 0), for varlen attention."""
    n, seq_len = seq_idx_NL.shape
    flat = seq_idx_NL.astype(np.int64) + (np.arange(n, dtype=np.int64) * (seq_len + 1))[:, None]
    change = np.flatnonzero(np.diff(flat.reshape(-1))) + 1
    return np.concatenate(([0], change, [n * seq_len])).astype(np.int32)
