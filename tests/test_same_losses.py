"""tools/same_losses.py's comparison (CPU): identical records pass, any changed field or step count is named."""

from __future__ import annotations

from tools import same_losses as S


def _records(n, **change):
    out = [{"step": s, "loss": 5.0 / s, "grad_norm": 1.0, "lr": 1e-3, "tokens": 100, "seq_len": 256,
            "phase": "pretrain", "skipped": False, "time": 100.0 + s} for s in range(1, n + 1)]
    for step, (key, value) in change.items():
        out[int(step[1:]) - 1][key] = value
    return out


def test_identical_runs_have_no_differences_even_in_wall_time():
    base, new = _records(5), _records(5)
    new[2]["time"] = 999.0  # wall time is not compared
    assert S.compare(base, new) == []


def test_a_last_bit_difference_and_a_short_run_are_reported():
    base = _records(5)
    new = _records(4, s3=("loss", base[2]["loss"] + 2**-40))
    problems = S.compare(base, new)
    assert problems[0] == "5 steps in the baseline, 4 here"
    assert problems[1].startswith("step 3: loss ") and len(problems) == 2
