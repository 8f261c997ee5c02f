"""Statistics of paired retrieval outcomes (the ``state`` suite) and of generated text (``generation``).

Paired outcomes: each item is answered under two conditions (the full model, and the model with its SSM
state or its attention cut before the query). McNemar's exact test asks whether the two conditions
differ, from the discordant pairs alone: ``b`` items right in the first condition only, ``c`` in the
second only; under the null hypothesis each discordant pair goes either way with probability 1/2, so the
two-sided p-value is ``min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``. The memory-reliance score of a
cut is ``(acc_full - acc_cut) / acc_full``: the share of the full model's accuracy that needs what was cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """{"n", "b", "c", "p_value"} for the same items answered under two conditions."""
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


def reliance(acc_full: float, acc_cut: float) -> float | None:
    """(acc_full - acc_cut) / acc_full; None when the full model answers nothing (nothing to rely on)."""
    return None if acc_full <= 0 else (acc_full - acc_cut) / acc_full


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all sequences (distinct-1, distinct-2 of Li et al., 2016)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequence: Sequence[int], n: int = 4, first: int = 200) -> float:
    """Share of the n-grams within the first ``first`` tokens that repeat an earlier one (rep-n of Welleck et
    al., 2020: 1 - distinct / total)."""
    head = list(sequence[:first])
    grams = [tuple(head[i:i + n]) for i in range(len(head) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
