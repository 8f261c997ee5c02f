"""losses.jsonl across a resume (training/loss_log.py): each step once, in order, like a straight run."""

from __future__ import annotations

import json

from hybrid_megatron.training.loss_log import LossLog


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_records_past_the_resume_step_and_a_torn_line_are_dropped(tmp_path):
    path = tmp_path / "losses.jsonl"
    log = LossLog(path, resume_step=0)
    for step in range(1, 8):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # the process died mid-line
    log = LossLog(path, resume_step=5)  # the last checkpoint was at step 5
    assert _steps(path) == [1, 2, 3, 4, 5]
    for step in range(6, 9):
        log.write({"step": step, "loss": 0.0})
    log.close()
    assert _steps(path) == list(range(1, 9))
    record = json.loads(path.read_text().splitlines()[-1])
    assert record["loss"] == 0.0 and isinstance(record["time"], float)


def test_a_clean_resume_leaves_the_file_alone(tmp_path):
    path = tmp_path / "losses.jsonl"
    log = LossLog(path, resume_step=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    log.close()
    before = path.read_text()
    LossLog(path, resume_step=3).close()
    assert path.read_text() == before
