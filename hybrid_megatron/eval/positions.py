"""Loss by token position: the arithmetic of the ``length`` suite, independent of the model.

A token's position is its ``position_ids`` entry: with the packing switch on, its offset inside its own
document (the context the model had for it), else its offset in the window. The loss at position p is
that of predicting token p + 1 from the p + 1 tokens before it. Positions fall in bins of ``bin_size``;
each bin keeps (loss sum, token count), so bins add up across micro-batches, ranks and sources exactly.
"""

from __future__ import annotations

import math


def num_bins(window: int, bin_size: int) -> int:
    return -(-window // bin_size)


def position_bins(losses, positions, mask, bin_size: int, bins: int):
    """[2, bins] float64: per bin, the masked loss sum and the masked token count."""
    import torch

    idx = torch.div(positions.reshape(-1), bin_size, rounding_mode="floor").clamp_(max=bins - 1)
    weight = mask.reshape(-1).double()
    sums = torch.bincount(idx, weights=losses.reshape(-1).double() * weight, minlength=bins)
    counts = torch.bincount(idx, weights=weight, minlength=bins)
    return torch.stack([sums, counts])


def curve(sums_counts, bin_size: int, min_tokens: int = 1) -> list[dict]:
    """Rows {"start", "end", "loss", "tokens"} for the bins with at least ``min_tokens`` tokens."""
    sums, counts = (list(map(float, row)) for row in sums_counts)
    rows = []
    for b, (s, n) in enumerate(zip(sums, counts)):
        if n >= min_tokens:
            rows.append({"start": b * bin_size, "end": (b + 1) * bin_size, "loss": s / n, "tokens": int(n)})
    return rows


def beyond(rows: list[dict], train_len: int) -> dict | None:
    """Mean loss over the positions past the training length (token-weighted), or None when there are none."""
    past = [r for r in rows if r["start"] >= train_len]
    tokens = sum(r["tokens"] for r in past)
    if not tokens:
        return None
    loss = sum(r["loss"] * r["tokens"] for r in past) / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}


def octave_groups(rows: list[dict], per_octave: int = 4) -> list[dict]:
    """Consecutive bins merged into groups of 1/``per_octave`` octave of position (exactly: token-weighted),
    for a plot on a log axis: early positions keep their bins, late ones pool enough tokens to read."""
    if not rows:
        return []
    width = rows[0]["end"] - rows[0]["start"]
    groups: dict[int, dict] = {}
    for r in rows:
        g = math.floor(per_octave * math.log2((r["start"] + r["end"]) / width))  # by the bin's middle
        cur = groups.setdefault(g, {"start": r["start"], "end": r["end"], "loss_sum": 0.0, "tokens": 0})
        cur["end"] = r["end"]
        cur["loss_sum"] += r["loss"] * r["tokens"]
        cur["tokens"] += r["tokens"]
    return [{"start": g["start"], "end": g["end"], "loss": g["loss_sum"] / g["tokens"], "tokens": g["tokens"]}
            for _, g in sorted(groups.items())]
