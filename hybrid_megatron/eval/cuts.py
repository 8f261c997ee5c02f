"""Where the ``state`` suite cuts a model's memory, as arrays the model takes.

The SSM-state cut restarts the Mamba layers at a chosen position of each row through the mechanism that
packing uses at document boundaries: a new segment in ``seq_idx`` (Mamba-2's kernels reset their state
where it changes) and a boundary in the ``cu_seqlens`` derived from it; the attention layers keep the
uncut boundaries and still see every earlier token of the document. Position ids are not touched, so the
restarted segment keeps its place in the document.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.packing import cu_seqlens


def cut_seq_idx(seq_idx_NL: np.ndarray, cuts_N: np.ndarray) -> np.ndarray:
    """``seq_idx`` with a new segment from position ``cuts_N[r]`` of row ``r`` on (-1: no cut in that row);
    a cut at position 0 or at an existing document start changes nothing."""
    seq_idx_NL = np.asarray(seq_idx_NL)
    n, length = seq_idx_NL.shape
    cuts_N = np.asarray(cuts_N, np.int64)
    if cuts_N.shape != (n,):
        raise ValueError(f"one cut position per row: {cuts_N.shape} for {n} rows")
    if (cuts_N >= length).any() or (cuts_N < -1).any():
        raise ValueError(f"cut positions must lie in [0, {length}) or be -1 (no cut): {cuts_N.tolist()}")
    starts = np.zeros((n, length), bool)
    starts[:, 1:] = np.diff(seq_idx_NL, axis=1) != 0
    rows = np.flatnonzero(cuts_N > 0)
    starts[rows, cuts_N[rows]] = True
    return np.cumsum(starts, axis=1, dtype=np.int32)


def ssm_cut(seq_idx_NL: np.ndarray, cuts_N: np.ndarray) -> dict[str, np.ndarray]:
    """{"mamba": (seq_idx, cu_seqlens) with the cuts, "attention": (seq_idx, cu_seqlens) without}."""
    cut = cut_seq_idx(seq_idx_NL, cuts_N)
    return {"mamba": (cut, cu_seqlens(cut)), "attention": (np.asarray(seq_idx_NL), cu_seqlens(np.asarray(seq_idx_NL)))}
