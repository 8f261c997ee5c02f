"""CPU checks of the loss-parity comparison (devtools/parity_compare.py): it runs on loss records written the way
the training loop writes them (the runs themselves need GPUs) and must judge a drift, a step past the tolerance, a
time-limited run and a missing one right."""

from __future__ import annotations

import pytest

from parity_records import loss_records, ok_run
from hybrid_megatron.devtools.parity_compare import compare_run, compare_suite, format_table
from hybrid_megatron.devtools.parity_suites import Run, Suite, expected_steps


def test_a_run_its_time_limit_stopped_after_the_last_step_is_compared_and_flagged():
    base, run = Run("a", 1, ()), Run("b", 1, (), reference="a")
    stopped = {"status": "failed", "exit": 124, "losses": loss_records(range(1, 11))}
    row = compare_run(run, 10, {"a": ok_run(loss_records(range(1, 11))), "b": stopped})
    assert row["verdict"] == "pass" and "time limit after its last step" in row["note"]
    assert "(exit 124: stopped by its time limit" in format_table([row])
    assert compare_run(base, 10, {"a": stopped})["verdict"] == "baseline"
    assert compare_run(run, 10, {"a": stopped, "b": ok_run(loss_records(range(1, 11)))})["verdict"] == "pass"
    # stopped before its last step, or failed otherwise: not compared
    early = {"status": "failed", "exit": 124, "losses": loss_records(range(1, 10))}
    crashed = {"status": "failed", "exit": 1, "losses": loss_records(range(1, 11))}
    for bad in (early, crashed):
        assert compare_run(run, 10, {"a": ok_run(loss_records(range(1, 11))), "b": bad})["verdict"] == "failed"
        assert compare_run(run, 10, {"a": bad, "b": ok_run(loss_records(range(1, 11)))})["verdict"] == "no reference"


def test_identical_curves_pass_bitwise():
    base, run = Run("a", 1, ()), Run("b", 2, (), reference="a")
    results = {"a": ok_run(loss_records(range(1, 11))), "b": ok_run(loss_records(range(1, 11)))}
    assert compare_run(base, 10, results)["verdict"] == "baseline"
    row = compare_run(run, 10, results)
    assert row["verdict"] == "pass" and row["bitwise"] and row["max_rel_diff"] == 0
    assert row["tokens_per_s"] == pytest.approx(1000 / 0.5)  # input tokens, not the 600 loss tokens


def test_one_step_past_the_tolerance_fails_and_is_named():
    run = Run("b", 2, (), reference="a", rel_tol=0.01)
    bumped = loss_records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * (1.02 if s == 7 else 1.0))
    row = compare_run(run, 10, {"a": ok_run(loss_records(range(1, 11))), "b": ok_run(bumped)})
    assert row["verdict"] == "FAIL" and row["worst_step"] == 7 and row["max_rel_diff"] == pytest.approx(0.02)
    within = loss_records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * 1.005)
    row = compare_run(run, 10, {"a": ok_run(loss_records(range(1, 11))), "b": ok_run(within)})
    assert row["verdict"] == "pass" and not row["bitwise"]


def test_mean_diff_tells_a_drift_from_noise():
    run = Run("b", 2, (), reference="a", rel_tol=0.05)
    ref = ok_run(loss_records(range(1, 11)))
    drift = loss_records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * 1.01)
    noise = loss_records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * (1.02 if s % 2 else 0.98))
    assert compare_run(run, 10, {"a": ref, "b": ok_run(drift)})["mean_rel_diff"] == pytest.approx(0.01)
    row = compare_run(run, 10, {"a": ref, "b": ok_run(noise)})
    assert row["mean_rel_diff"] == pytest.approx(0.0, abs=1e-12) and row["max_rel_diff"] == pytest.approx(0.02)


def test_a_windowed_run_is_judged_on_its_logged_means():
    run = Run("fp8", 1, (), reference="bf16", rel_tol=0.015, after_step=10, window=10)
    ref = ok_run(loss_records(range(1, 31)))
    spike = loss_records(range(1, 31), loss=lambda s: (5.0 - 0.01 * s) * (1.03 if s == 15 else 1.0))
    row = compare_run(run, 30, {"bf16": ref, "fp8": ok_run(spike)})
    assert row["verdict"] == "pass" and row["compared_steps"] == [20, 30]
    assert row["max_step_rel_diff"] == pytest.approx(0.03) and row["max_rel_diff"] == pytest.approx(0.003, rel=0.05)
    offset = loss_records(range(1, 31), loss=lambda s: (5.0 - 0.01 * s) * (1.02 if 21 <= s <= 30 else 1.0))
    row = compare_run(run, 30, {"bf16": ref, "fp8": ok_run(offset)})
    assert row["verdict"] == "FAIL" and row["worst_step"] == 30 and row["max_rel_diff"] == pytest.approx(0.02)


def test_runs_are_read_against_the_baselines_repeat():
    """A suite with a spread run: every other run compared with the same baseline says whether its
    largest distance lies within the repeat's; the verdicts stay the tolerance's."""
    suite = Suite("s", "configs/tiny.yaml", (), (
        Run("base", 1, ()),
        Run("repeat", 1, (), reference="base", rel_tol=0.015),
        Run("close", 1, (), reference="base", rel_tol=0.015),
        Run("far", 1, (), reference="base", rel_tol=0.015),
    ), default_steps=10, spread_run="repeat")
    steps = range(1, 11)

    def bumped(size):
        return ok_run(loss_records(steps, loss=lambda s: (5.0 - 0.01 * s) * (1 + size if s in (4, 8) else 1.0)))

    results = {"base": ok_run(loss_records(steps)), "repeat": bumped(0.03), "close": bumped(0.02), "far": bumped(0.04)}
    rows = {r["run"]: r for r in compare_suite(suite, 10, results)}
    assert rows["close"]["verdict"] == rows["far"]["verdict"] == rows["repeat"]["verdict"] == "FAIL"
    assert rows["close"]["over_tol"] == [2, 10] and rows["close"]["within_spread"] is True
    assert rows["far"]["within_spread"] is False
    assert rows["far"]["spread_max_rel_diff"] == pytest.approx(0.03)
    assert "within_spread" not in rows["repeat"] and "within_spread" not in rows["base"]
    table = format_table(list(rows.values()))
    assert "2/10" in table and "(within the baseline's repeat (3.00e-02))" in table
    assert "(beyond the baseline's repeat" in table
    del results["repeat"]  # no repeat run: nothing to read against
    assert not any("within_spread" in r for r in compare_suite(suite, 10, results))


def test_missing_repeated_steps_or_other_data_fail():
    run = Run("b", 2, (), reference="a")
    ref = ok_run(loss_records(range(1, 11)))
    missing = loss_records([s for s in range(1, 11) if s != 4])
    assert compare_run(run, 10, {"a": ref, "b": ok_run(missing)})["missing_steps"] == [4]
    assert compare_run(run, 10, {"a": ref, "b": ok_run(missing)})["verdict"] == "FAIL"
    repeated = loss_records(range(1, 11)) + loss_records([5, 6])
    row = compare_run(run, 10, {"a": ref, "b": ok_run(repeated)})
    assert row["repeated_steps"] == 2 and row["verdict"] == "FAIL"
    other_data = ok_run(loss_records(range(1, 11), tokens=999))
    row = compare_run(run, 10, {"a": ref, "b": other_data})
    assert not row["same_tokens"] and row["verdict"] == "FAIL"


def test_warmup_steps_are_not_compared():
    run = Run("fp8", 1, (), reference="bf16", rel_tol=0.015, after_step=3)
    early_gap = loss_records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * (1.5 if s <= 3 else 1.0))
    row = compare_run(run, 10, {"bf16": ok_run(loss_records(range(1, 11))), "fp8": ok_run(early_gap)})
    assert row["verdict"] == "pass" and row["compared_steps"] == [4, 10]


def test_a_resume_run_is_compared_on_the_steps_after_the_checkpoint():
    run = Run("x>y", 1, (), reference="x", resume_from="x", resume_steps=5)
    assert expected_steps(run, 60) == [31, 32, 33, 34, 35]
    results = {"x": ok_run(loss_records(range(1, 61))), "x>y": ok_run(loss_records(range(31, 36)))}
    row = compare_run(run, 60, results)
    assert row["verdict"] == "pass" and row["compared_steps"] == [31, 35] and row["first_step_rel_diff"] == 0
    results["x>y"] = ok_run(loss_records(range(30, 36)))  # a step before the checkpoint was trained again
    assert compare_run(run, 60, results)["extra_steps"] == [30]


def test_failed_or_absent_runs_and_references():
    run = Run("b", 2, (), reference="a")
    assert compare_run(run, 10, {})["verdict"] == "not run"
    assert compare_run(run, 10, {"b": {"status": "failed", "losses": []}})["verdict"] == "failed"
    assert compare_run(run, 10, {"b": ok_run(loss_records(range(1, 11)))})["verdict"] == "no reference"
    assert compare_run(Run("a", 1, ()), 10, {"a": ok_run(loss_records(range(1, 9)))})["verdict"] == "incomplete"
