"""Eval results over training (``compare``): every evaluated checkpoint of a run, its headline numbers against
the input tokens the run had seen at that step, one panel per metric (``evals_vs_tokens.png``).

When recall emerges, whether lm-eval accuracy is still climbing at the end, whether the loss past the training
length improves with the loss itself: questions a run's last evaluation cannot answer. ``eval`` writes each
checkpoint's results under ``<run dir>/eval/step-N/``; evaluating several checkpoints of a run (a loop over its
``checkpoints/step-*`` directories) gives the curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from hybrid_megatron.eval import plots, report

MAX_PANELS = 16
SUITE_ORDER = ("ppl", "lm-eval", "mqar", "state", "niah", "length", "generation")


@dataclass(frozen=True, slots=True)
class Evaluated:
    """One evaluated checkpoint of a run."""

    step: int
    tokens: int | None  # input tokens up to this step (None: the step is not in the run's losses.jsonl)
    metrics: dict[str, float]
    mqar: dict | None  # the mqar suite as eval wrote it, for the paired comparison of runs


def read(run_dir: Path, tokens_at: dict[int, int]) -> list[Evaluated]:
    """Every ``eval/step-*/results.json`` of the run, by step; ``tokens_at``: step -> input tokens so far."""
    out = []
    for path in run_dir.glob(f"eval/step-*/{report.RESULTS}"):
        results = report.read(path)
        try:
            step, metrics = int(results["step"]), report.headline(results)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{path}: not what eval writes ({type(exc).__name__}: {exc}); edited or damaged") from None
        out.append(Evaluated(step, tokens_at.get(step), metrics, results["suites"].get("mqar")))
    steps = [e.step for e in out]
    if len(set(steps)) != len(steps):
        twice = sorted({s for s in steps if steps.count(s) > 1})
        raise DataError(f"{run_dir}/eval: step {twice[0]} evaluated in two directories; keep one")
    return sorted(out, key=lambda e: e.step)


def _rank(metric: str) -> tuple[int, str]:
    suite = metric.split("/")[0]
    return (SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER), metric)


def plot(curves: dict[str, list[Evaluated]], path: Path, styles: dict[str, dict] | None = None) -> dict | None:
    """One panel per metric that some run has at two or more evaluated steps (the first ``MAX_PANELS`` in
    ``SUITE_ORDER``), every run a line (``styles``: matplotlib keywords per run, its colour and legend label; by
    default a colour each, labelled by name). None when no metric has two points: a single evaluation is no
    curve. Returns {"plotted": [...], "left_out": [...]}."""
    def points(evals: list[Evaluated], metric: str) -> list[tuple[int, float]]:
        return [(e.tokens, e.metrics[metric]) for e in evals if e.tokens is not None and metric in e.metrics]

    metrics = sorted({m for evals in curves.values() for e in evals for m in e.metrics
                      if len(points(evals, m)) >= 2}, key=_rank)
    if not metrics:
        return None
    drawn, left_out = metrics[:MAX_PANELS], metrics[MAX_PANELS:]
    columns = min(4, len(drawn))
    rows = (len(drawn) + columns - 1) // columns
    fig, axes = plots.pyplot().subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, drawn):
        for k, (name, evals) in enumerate(curves.items()):
            xy = points(evals, metric)
            if xy:
                style = (styles or {}).get(name, {"color": f"C{k % 10}", "label": name})
                ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", ms=3, **style)
        ax.set_title(metric, fontsize=8)
        ax.set_xscale("log")
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    axes.flat[0].set_xlabel("tokens", fontsize=8)
    plots.save(fig, axes.flat[0], path, legend_size=7, grid_axis=None)
    return {"plotted": drawn, "left_out": left_out}
