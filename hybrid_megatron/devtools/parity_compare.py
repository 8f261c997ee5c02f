"""Loss-curve parity: one run's losses against its reference's, step by step, and the table of a suite
(``tools/loss_parity.py`` runs the suites; this part is pure and runs anywhere, on the ``<suite>_runs.json`` files
it writes). A run passes when it has every step it should, saw the same tokens per step as its reference (the same
data), and its loss stays within the run's tolerance; a suite's ``spread_run`` (a repeat of the baseline) is the
run-to-run spread every other row is read against."""

from __future__ import annotations

import json
from pathlib import Path

from hybrid_megatron.devtools.bench import tokens_per_s
from hybrid_megatron.devtools.parity_suites import Run, Suite, expected_steps


def by_step(records: list[dict]) -> dict[int, dict]:
    """Step -> record; a step logged twice (a repeated step) keeps its last record."""
    return {int(r["step"]): r for r in records}


TIME_LIMIT_EXITS = (124, 137)  # timeout's SIGTERM / SIGKILL


def usable(result: dict | None, expected: list[int]) -> bool:
    """Its losses can be compared: the run exited 0, or its time limit stopped it after it had logged
    every step it should (the table then says so)."""
    if result is None:
        return False
    if result.get("status") == "ok":
        return True
    logged = {int(r["step"]) for r in result.get("losses", [])}
    return result.get("exit") in TIME_LIMIT_EXITS and set(expected) <= logged


def compare_run(run: Run, steps: int, results: dict[str, dict]) -> dict:
    """One row of the parity table for ``run`` against its reference (both from ``results``)."""
    row: dict = {"run": run.name, "reference": run.reference, "rel_tol": run.rel_tol}
    mine = results.get(run.name)
    want = expected_steps(run, steps)
    if not usable(mine, want):
        return {**row, "verdict": "not run" if mine is None else mine.get("status", "failed")}
    if mine.get("status") != "ok":
        row["note"] = f"exit {mine['exit']}: stopped by its time limit after its last step"
    got = by_step(mine["losses"])
    row["missing_steps"] = [s for s in want if s not in got][:10]
    row["extra_steps"] = sorted(set(got) - set(want))[:10]
    row["repeated_steps"] = len(mine["losses"]) - len(got)
    row["tokens_per_s"] = tokens_per_s(mine["losses"])
    if run.reference is None:
        complete = not (row["missing_steps"] or row["extra_steps"] or row["repeated_steps"])
        return {**row, "verdict": "baseline" if complete else "incomplete"}
    ref = results.get(run.reference)
    if not usable(ref, list(range(1, steps + 1))):  # references are whole runs
        return {**row, "verdict": "no reference"}
    ref_steps = by_step(ref["losses"])
    compared = [s for s in want if s in got and s in ref_steps and s > run.after_step]
    if not compared:
        return {**row, "verdict": "nothing to compare"}
    signed = [(got[s]["loss"] - ref_steps[s]["loss"]) / max(abs(ref_steps[s]["loss"]), 1e-12) for s in compared]
    step_diffs = [abs(d) for d in signed]
    points, diffs = compared, step_diffs
    if run.window > 1:  # the logged losses: window means ending at multiples of the window
        w = run.window
        points = [s for s in compared if s % w == 0 and all(t in got and t in ref_steps for t in range(s - w + 1, s + 1))]
        if not points:
            return {**row, "verdict": "nothing to compare"}
        diffs = [abs(window_mean(got, s, w) - window_mean(ref_steps, s, w)) / max(abs(window_mean(ref_steps, s, w)), 1e-12)
                 for s in points]
        row.update(window=w, max_step_rel_diff=max(step_diffs))
    worst = max(range(len(points)), key=diffs.__getitem__)
    row.update(
        compared_steps=[points[0], points[-1]],
        max_rel_diff=diffs[worst],
        over_tol=[sum(d > run.rel_tol for d in diffs), len(points)],  # compared points past the bar, of all
        mean_rel_diff=sum(signed) / len(signed),  # signed, every step: a drift shows here, noise averages out
        worst_step=points[worst],
        first_step_rel_diff=step_diffs[0],
        bitwise=all(got[s]["loss"] == ref_steps[s]["loss"] for s in compared),
        same_tokens=all(got[s]["tokens"] == ref_steps[s]["tokens"] for s in compared),
    )
    ok = (not row["missing_steps"] and not row["repeated_steps"] and row["same_tokens"]
          and row["max_rel_diff"] <= run.rel_tol)
    row["verdict"] = "pass" if ok else "FAIL"
    return row


def window_mean(records: dict[int, dict], end: int, window: int) -> float:
    """Token-weighted mean loss of steps end-window+1 .. end (what a log line at ``end`` shows)."""
    rows = [records[s] for s in range(end - window + 1, end + 1)]
    return sum(r["loss"] * r["tokens"] for r in rows) / max(sum(r["tokens"] for r in rows), 1)


def compare_suite(suite: Suite, steps: int, results: dict[str, dict]) -> list[dict]:
    rows = [compare_run(run, steps, results) for run in suite.runs]
    spread = next((r for r in rows if r["run"] == suite.spread_run and "max_rel_diff" in r), None)
    if spread is not None:  # read every other compared run against the baseline's own repeat
        for r in rows:
            if r is not spread and "max_rel_diff" in r and r["reference"] == spread["reference"]:
                r["spread_max_rel_diff"] = spread["max_rel_diff"]
                r["within_spread"] = r["max_rel_diff"] <= spread["max_rel_diff"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<36}{'reference':<12}{'steps':>9}{'max rel diff':>14}{'at step':>9}{'over tol':>10}"
             f"{'mean diff':>11}{'bitwise':>9}{'tok/s':>11}  verdict"]
    for r in rows:
        span = "-".join(map(str, r["compared_steps"])) if "compared_steps" in r else "-"
        diff = f"{r['max_rel_diff']:.2e}" if "max_rel_diff" in r else "-"
        over = "/".join(map(str, r["over_tol"])) if "over_tol" in r else "-"
        rate = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        mean = f"{r['mean_rel_diff']:+.2e}" if "mean_rel_diff" in r else "-"
        notes = [r["note"]] if r.get("note") else []
        if "within_spread" in r:
            notes.append(f"{'within' if r['within_spread'] else 'beyond'} the baseline's repeat "
                         f"({r['spread_max_rel_diff']:.2e})")
        lines.append(f"{r['run']:<36}{r['reference'] or '-':<12}{span:>9}{diff:>14}{r.get('worst_step', '-'):>9}"
                     f"{over:>10}{mean:>11}{str(r.get('bitwise', '-')):>9}{rate:>11}  {r['verdict']}"
                     + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def merge_results(paths: list[Path]) -> tuple[int | None, dict[str, dict]]:
    """Runs from several ``<suite>_runs.json`` files (later files win); returns (steps, runs)."""
    steps, runs = None, {}
    for path in paths:
        data = json.loads(path.read_text())
        if steps is not None and data["steps"] != steps:
            raise SystemExit(f"error: {path} has steps={data['steps']}, an earlier file has {steps}")
        steps = data["steps"]
        runs.update(data["runs"])
    return steps, runs
