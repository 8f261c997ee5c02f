"""The `length` suite's arithmetic: loss by position, bins that add up exactly across splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.packing import build_arrays
from hybrid_megatron.eval import positions


def _naive(losses, pos, mask, bin_size, bins):
    sums, counts = [0.0] * bins, [0.0] * bins
    for loss, p, m in zip(losses.ravel().tolist(), pos.ravel().tolist(), mask.ravel().tolist()):
        b = min(p // bin_size, bins - 1)
        sums[b] += loss * m
        counts[b] += m
    return sums, counts


def test_bins_equal_a_plain_loop_and_add_up_across_micro_batches():
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(6, 40, generator=gen) * 5
    pos = torch.randint(0, 40, (6, 40), generator=gen)
    mask = (torch.rand(6, 40, generator=gen) > 0.2).float()
    whole = positions.position_bins(losses, pos, mask, 8, 5)
    sums, counts = _naive(losses, pos, mask, 8, 5)
    assert whole[0].tolist() == pytest.approx(sums, rel=1e-12) and whole[1].tolist() == counts
    halves = positions.position_bins(losses[:3], pos[:3], mask[:3], 8, 5) + positions.position_bins(
        losses[3:], pos[3:], mask[3:], 8, 5)
    assert torch.allclose(halves, whole, rtol=0, atol=1e-9)


def test_packed_windows_bin_by_position_inside_the_document():
    eos = 9
    window = np.array([[1, 2, 3, eos, 4, 5, eos, 6, 7, 8, 1, 2, 3]])  # documents of 4, 3 and 6 tokens
    arrays = build_arrays(window, eos, True, False)
    assert arrays["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    losses = torch.arange(12, dtype=torch.float64).reshape(1, 12)
    table = positions.position_bins(losses, torch.from_numpy(arrays["position_ids"]),
                                    torch.from_numpy(arrays["loss_mask"]).float(), 2, 3)
    # positions 0-1: tokens 0,1,4,5,7,8; 2-3: 2,3,6,9,10; 4+: 11
    assert table[1].tolist() == [6, 5, 1]
    assert table[0].tolist() == [0 + 1 + 4 + 5 + 7 + 8, 2 + 3 + 6 + 9 + 10, 11]
    unpacked = build_arrays(window, eos, False, False)
    assert unpacked["position_ids"][0].tolist() == list(range(12))


def test_curve_and_the_loss_past_the_training_length():
    table = [[10.0, 0.0, 9.0, 4.0], [5.0, 0.0, 3.0, 1.0]]
    rows = positions.curve(table, 100)
    assert [(r["start"], r["end"], r["tokens"]) for r in rows] == [(0, 100, 5), (200, 300, 3), (300, 400, 1)]
    assert rows[0]["loss"] == 2.0 and rows[1]["loss"] == 3.0
    past = positions.beyond(rows, 200)
    assert past["tokens"] == 4 and past["loss"] == pytest.approx(13 / 4) and past["ppl"] == pytest.approx(math.exp(3.25))
    assert positions.beyond(rows, 400) is None
    assert positions.num_bins(1000, 128) == 8 and positions.num_bins(1024, 128) == 8


def test_octave_groups_pool_late_bins_exactly():
    rows = [{"start": b * 128, "end": (b + 1) * 128, "loss": 1.0 + 0.01 * b, "tokens": 100 + b} for b in range(64)]
    groups = positions.octave_groups(rows)
    assert sum(g["tokens"] for g in groups) == sum(r["tokens"] for r in rows)
    total = sum(r["loss"] * r["tokens"] for r in rows)
    assert sum(g["loss"] * g["tokens"] for g in groups) == pytest.approx(total, rel=1e-12)
    assert [(g["start"], g["end"]) for g in groups[:3]] == [(0, 128), (128, 256), (256, 384)]  # early bins kept
    assert groups[-1]["end"] == 8192 and groups[-1]["end"] - groups[-1]["start"] > 1024  # late bins pooled
    starts = [g["start"] for g in groups]
    assert starts == sorted(starts) and all(a["end"] == b["start"] for a, b in zip(groups, groups[1:]))
