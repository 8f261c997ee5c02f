"""Loss and gradient-norm spikes of a run (``compare``): the spike score OLMo 2 reports for its runs.

A value is a spike when it lies more than ``SIGMAS`` (7) standard deviations above the mean of the ``WINDOW``
(1000) values before it; the spike score is the share of values that are spikes (OLMo 2 counts deviations either
way; only rises are counted here, because the loss falls fast early on and again during an anneal, and a fall is
not the instability this measures). The first ``MIN_HISTORY`` steps of a run are not scored: the window is too
short to say what a normal value is. Skipped steps (a non-finite loss or gradient, which ``pretrain`` does not
apply) are counted apart and left out of the series.
"""

from __future__ import annotations

import math

import numpy as np

WINDOW = 1000
SIGMAS = 7.0
MIN_HISTORY = 50
TOP = 3  # spikes listed per series, the largest first


def spikes(values, window: int = WINDOW, sigmas: float = SIGMAS, min_history: int = MIN_HISTORY) -> np.ndarray:
    """Indices of the values more than ``sigmas`` standard deviations above the mean of the ``window`` values
    before each (at least ``min_history`` of them), and their z-scores: an array of (index, z) rows."""
    x = np.asarray(values, dtype=np.float64)
    if x.size <= min_history:
        return np.zeros((0, 2))
    # running sums of the values before each index, centred on the first value for precision
    c = x - x[0]
    s1 = np.concatenate([[0.0], np.cumsum(c)])
    s2 = np.concatenate([[0.0], np.cumsum(c * c)])
    idx = np.arange(min_history, x.size)
    start = np.maximum(idx - window, 0)
    count = idx - start
    mean = (s1[idx] - s1[start]) / count
    var = np.maximum((s2[idx] - s2[start]) / count - mean * mean, 0.0)
    std = np.sqrt(var)
    # a history without spread (a constant) gives no measure of what is normal: nothing there is scored a spike
    scale = np.where(std > 1e-12 * np.maximum(np.abs(mean + x[0]), 1.0), std, np.inf)
    z = (c[idx] - mean) / scale
    hit = z > sigmas
    return np.stack([idx[hit], z[hit]], axis=1)


def _series(name: str, steps: list[int], values: list[float]) -> dict:
    found = spikes(values)
    scored = max(len(values) - MIN_HISTORY, 0)
    top = sorted(found.tolist(), key=lambda row: -row[1])[:TOP]
    return {"score": (len(found) / scored) if scored else None, "spikes": len(found), "scored_steps": scored,
            "largest": [{"step": steps[int(i)], name: values[int(i)], "z": z} for i, z in top]}


def health(steps: list[tuple[int, float, float | None, bool]]) -> dict:
    """The spike scores of a run's ``losses.jsonl``, read as (step, loss, grad norm or None, skipped) per record."""
    kept = [(step, loss, norm) for step, loss, norm, skipped in steps if not skipped]
    out = {"steps": len(steps), "skipped": len(steps) - len(kept),
           "loss": _series("loss", [s for s, _, _ in kept], [loss for _, loss, _ in kept])}
    norms = [(s, norm) for s, _, norm in kept if norm is not None and math.isfinite(norm)]
    out["grad_norm"] = _series("grad_norm", [s for s, _ in norms], [g for _, g in norms]) if norms else None
    return out


def _cell(series: dict | None) -> str:
    if series is None or series["score"] is None:
        return "-"
    text = f"{series['score']:.2%} ({series['spikes']})"
    if series["largest"]:
        worst = series["largest"][0]
        text += f", largest at step {worst['step']} ({worst['z']:.0f} sigma)"
    return text


def markdown(by_run: dict[str, dict]) -> list[str]:
    """The section of compare's report: one row per run."""
    lines = ["## Training health", "",
             f"Spike score: the share of steps whose value is more than {SIGMAS:g} standard deviations above the mean "
             f"of the {WINDOW} steps before it (OLMo 2's measure, rises only; the first {MIN_HISTORY} steps are not "
             "scored).", "", "| run | steps | skipped (non-finite) | loss spike score | grad-norm spike score |",
             "| --- | --- | --- | --- | --- |"]
    for name, h in by_run.items():
        lines.append(f"| {name} | {h['steps']:,} | {h['skipped']} | {_cell(h['loss'])} | {_cell(h['grad_norm'])} |")
    return lines + [""]
