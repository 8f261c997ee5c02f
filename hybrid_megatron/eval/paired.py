"""Statistics of paired retrieval outcomes: the same MQAR items answered under two conditions (the ``state``
suite: the full model and the model with its SSM state or its attention cut before the queries; ``compare``: two
runs on the same items).

McNemar's exact test asks whether two conditions differ, from the discordant pairs alone: ``b`` answers right in
the first condition only, ``c`` in the second only; under the null hypothesis each discordant pair goes either way
with probability 1/2, so the two-sided p-value is ``min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``.

That treats every answer as independent, and an MQAR item asks several queries of one sequence: its answers share
the sequence, the keys' spacing and whatever the model made of them, so they are not. ``mcnemar_items`` takes the
item as the unit instead: under the null hypothesis the two conditions' answers to one item are exchangeable, so
each item's discordance d_k = b_k - c_k is as likely to be negative as positive, whatever its size. The p-value is
the exact probability, over the 2^items sign flips, of a sum |sum s_k d_k| at least the observed |b - c|. With one
answer per item it is McNemar's exact test; its normal approximation is Durkalski et al.'s clustered McNemar
statistic (b - c)^2 / sum d_k^2 (Statistics in Medicine 22, 2003), used where the exact sum would take too long.

The memory-reliance score of a cut is ``(acc_full - acc_cut) / acc_full``: the share of the full model's accuracy
that needs what was cut. Outcomes are stored per item (``pack_outcomes``: a hex string, bit j = answer j), so a
later ``compare`` can pair two runs item by item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EXACT_WORK = 5 * 10**7  # items x summed |d_k| past which the sign-flip distribution is approximated


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """{"n", "b", "c", "p_value"} for the same answers under two conditions, every answer taken as independent."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes of different lengths: {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    n = b + c
    if n == 0:
        return {"n": len(first), "b": 0, "c": 0, "p_value": 1.0}
    k = min(b, c)
    # P[X <= k] for X ~ Binomial(n, 1/2), summed exactly in integers
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return {"n": len(first), "b": b, "c": c, "p_value": min(1.0, 2 * tail / 2**n)}


def mcnemar_items(first: np.ndarray, second: np.ndarray) -> dict:
    """McNemar's test with the item as the unit: first, second [items, answers] bool, the same answers under two
    conditions. {"items", "answers", "b", "c", "discordant_items" (items whose b_k - c_k is not 0), "p_value",
    "method": "exact" | "normal"}."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(f"paired outcomes must be [items, answers] of one shape: {first.shape} and {second.shape}")
    b_k = (first & ~second).sum(axis=1)
    c_k = (second & ~first).sum(axis=1)
    d = (b_k - c_k).astype(np.int64)
    out = {"items": int(first.shape[0]), "answers": int(first.size), "b": int(b_k.sum()), "c": int(c_k.sum()),
           "discordant_items": int(np.count_nonzero(d))}
    sizes = np.abs(d[d != 0])
    observed = abs(int(d.sum()))
    if sizes.size == 0 or observed == 0:
        return {**out, "p_value": 1.0, "method": "exact"}
    if sizes.size * int(sizes.sum()) > EXACT_WORK:
        z = observed / math.sqrt(float((sizes.astype(np.float64) ** 2).sum()))
        return {**out, "p_value": min(1.0, math.erfc(z / math.sqrt(2))), "method": "normal"}
    return {**out, "p_value": min(1.0, _sign_flip_tail(sizes, observed)), "method": "exact"}


def _sign_flip_tail(sizes: np.ndarray, observed: int) -> float:
    """P[|sum_k s_k a_k| >= observed] for independent fair signs s_k: the distribution of the sum built one item
    at a time (float64 sums of non-negative terms, so tails far below 1e-16 keep their relative precision)."""
    total = int(sizes.sum())
    dist = np.zeros(2 * total + 1)  # dist[total + x] = P[sum == x]
    dist[total] = 1.0
    for a in sizes.tolist():
        shifted = np.zeros_like(dist)
        shifted[a:] += dist[:-a]
        shifted[:-a] += dist[a:]
        dist = shifted * 0.5
    return float(dist[:total - observed + 1].sum() + dist[total + observed:].sum())


def reliance(acc_full: float, acc_cut: float) -> float | None:
    """(acc_full - acc_cut) / acc_full; None when the full model answers nothing (nothing to rely on)."""
    return None if acc_full <= 0 else (acc_full - acc_cut) / acc_full


def pack_outcomes(right: np.ndarray) -> list[str]:
    """[items, answers] bool -> one hex string per item, bit j (from the least significant) = answer j."""
    right = np.asarray(right, dtype=bool)
    weights = [1 << j for j in range(right.shape[1])]
    return [format(sum(w for w, r in zip(weights, row) if r), "x") for row in right.tolist()]


def unpack_outcomes(packed: Sequence[str], answers: int) -> np.ndarray:
    """``pack_outcomes``'s inverse: [items, answers] bool. A string that is not hex, or sets a bit past
    ``answers``, raises ValueError."""
    rows = []
    for k, text in enumerate(packed):
        try:
            value = int(text, 16)
        except (TypeError, ValueError):
            raise ValueError(f"item {k}: {text!r} is not a hex outcome string") from None
        if value < 0 or value >> answers:
            raise ValueError(f"item {k}: {text!r} sets answers past the item's {answers}")
        rows.append([bool(value >> j & 1) for j in range(answers)])
    return np.array(rows, dtype=bool).reshape(len(rows), answers)
