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
                 targets_NL1: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Model inputs for windows ``[N, L+1]`` (int64). ``targets_NL1``: the sources' loss-mask channel for the
    same tokens (1: train on the token as a label); a label outside it is not trained."""
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
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "seq_idx": seq_idx}


def sample_hash(window: np.ndarray) -> str:
    """Identity of a sample's token content (all ``L + 1`` tokens, as uint32), independent of dtype."""
    return hashlib.blake2b(np.ascontiguousarray(window, dtype="<u4").tobytes(), digest_size=8).hexdigest()


def cu_seqlens(seq_idx_NL: np.ndarray) -> np.ndarray:
    """Cumulative document lengths over the flattened batch (int32, starts with 0), for varlen attention."""
    n, seq_len = seq_idx_NL.shape
    flat = seq_idx_NL.astype(np.int64) + (np.arange(n, dtype=np.int64) * (seq_len + 1))[:, None]
    change = np.flatnonzero(np.diff(flat.reshape(-1))) + 1
    return np.concatenate(([0], change, [n * seq_len])).astype(np.int32)
