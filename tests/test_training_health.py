"""Spike scores of a run's losses.jsonl: injected spikes are found and nothing else is, the running window
matches a brute-force computation, and `compare` reports them per run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybrid_megatron.eval import training_health as th
from hybrid_megatron.eval.compare import compare
from tests.run_dirs import write_run


def _loss_curve(steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(1, steps + 1)
    # a run past its first steep fall (whose spread would hide a spike inside the window: the measure's nature)
    return 2.0 + 0.2 * np.exp(-t / 200) + rng.normal(0, 0.01, steps)


def test_the_running_window_matches_a_brute_force_computation():
    x = np.random.default_rng(1).standard_t(3, 600)  # heavy tails: some values clear a low bar
    found = th.spikes(x, window=40, sigmas=2.5, min_history=10)
    expected = []
    for i in range(10, x.size):
        prev = x[max(0, i - 40):i]
        z = (x[i] - prev.mean()) / prev.std()
        if z > 2.5:
            expected.append((i, z))
    assert len(expected) > 5
    assert found[:, 0].astype(int).tolist() == [i for i, _ in expected]
    np.testing.assert_allclose(found[:, 1], [z for _, z in expected], rtol=1e-9)


def test_injected_spikes_are_found_and_a_falling_or_annealed_loss_has_none():
    loss = _loss_curve(3000)
    assert th.spikes(loss).size == 0
    anneal = loss.copy()
    anneal[-300:] -= np.linspace(0, 0.3, 300)  # an anneal: the loss drops fast, which is no instability
    assert th.spikes(anneal).size == 0
    spiked = loss.copy()
    at = [400, 1200, 1201, 2500]
    spiked[at] += 0.5
    assert th.spikes(spiked)[:, 0].astype(int).tolist() == at
    early = loss[:200].copy()
    early[20] += 5.0  # inside the first MIN_HISTORY steps: not scored
    assert th.spikes(early).size == 0
    assert th.spikes(np.full(200, 2.0)).size == 0  # no spread, no measure of normal


def test_health_leaves_skipped_steps_and_non_finite_norms_out_of_the_series():
    loss = _loss_curve(400)
    loss[300] += 1.0
    records = [(s + 1, float(v), 1.0 + 0.01 * np.sin(s), False) for s, v in enumerate(loss)]
    records[100] = (101, float("nan"), float("nan"), True)
    records[200] = (201, 2.1, float("inf"), False)
    h = th.health(records)
    assert h["steps"] == 400 and h["skipped"] == 1
    assert h["loss"]["spikes"] == 1 and h["loss"]["largest"][0]["step"] == 301
    assert h["loss"]["scored_steps"] == 399 - th.MIN_HISTORY
    assert h["loss"]["score"] == pytest.approx(1 / (399 - th.MIN_HISTORY))
    assert h["grad_norm"]["scored_steps"] == 398 - th.MIN_HISTORY and h["grad_norm"]["spikes"] == 0
    assert th.health([(1, 2.0, None, False)])["grad_norm"] is None


def test_compare_reports_the_spike_scores(tmp_path):
    write_run(tmp_path, "a", ["model.hidden_size=256"], steps=600)
    write_run(tmp_path, "b", ["model.hidden_size=256"], steps=600)
    for name, spike_at in (("a", 450), ("b", None)):
        loss = _loss_curve(600, seed=ord(name))
        if spike_at:
            loss[spike_at - 1] += 1.0
        with open(tmp_path / name / "losses.jsonl", "w") as f:
            for s, v in enumerate(loss, 1):
                f.write(json.dumps({"step": s, "loss": float(v), "grad_norm": 0.5, "tokens": 32768, "seq_len": 1024,
                                    "skipped": False}) + "\n")
    summary = compare([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out")
    a, b = (r["health"] for r in summary["runs"])
    assert a["loss"]["spikes"] == 1 and a["loss"]["largest"][0]["step"] == 450 and b["loss"]["spikes"] == 0
    assert a["grad_norm"]["spikes"] == 0  # a constant norm: no spread, nothing scored a spike
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Training health" in report and "| a | 600 | 0 | 0.18% (1), largest at step 450 (" in report
    assert "| b | 600 | 0 | 0.00% (0) | 0.00% (0) |" in report
