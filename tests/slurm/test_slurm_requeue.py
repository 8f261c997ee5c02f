"""slurm/pretrain_7b.sh on a fake cluster (tests/slurm/fake_cluster.py): USR1/TERM forwarding, the final
checkpoint, requeue and its limits."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.slurm.fake_cluster import JOB_ID, finish


# ------------------------------------------------------------------------------ signals and requeue


def _wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the fake job")


def _signal_batch_script(cluster, proc, signum, num_tasks):
    """Wait until every rank is up, then signal the batch shell alone (what --signal=B: does)."""
    log = Path(cluster.env["FAKE_SLURM_LOG"])
    _wait_for(lambda: len(list(log.glob("run*-rank*.json"))) == num_tasks and (log / "batch.pid").exists())
    os.kill(int((log / "batch.pid").read_text()), signum)
    return finish(proc)


def test_usr1_checkpoints_requeues_and_the_restart_resumes(cluster):
    proc = cluster.sbatch("--nodes=2", extra_env={"FAKE_TRAIN_MODE": "wait"}, background=True)
    result = _signal_batch_script(cluster, proc, signal.SIGUSR1, 16)
    assert result.returncode == 75, result.stdout + cluster.job_log()
    first = cluster.ranks(restart=0)
    assert all(r["signals"] == ["SIGUSR1"] for r in first)  # forwarded to every task
    assert cluster.requeues() == [str(JOB_ID)]
    assert (cluster.run_dir / "checkpoints" / "latest").read_text() == "1"
    assert "requeuing job 4242" in cluster.job_log()

    # Slurm restarts the same job: same id, SLURM_RESTART_COUNT=1, same environment.
    result = cluster.sbatch("--nodes=2", extra_env={"FAKE_RESTART_COUNT": "1"})
    assert result.returncode == 0, result.stdout + cluster.job_log()
    second = cluster.ranks(restart=1)
    assert len(second) == 16
    assert [r["argv"] for r in second] == [r["argv"] for r in first]  # the very same command
    assert not any("step" in a or "load" in a for a in second[0]["argv"])
    assert second[0]["resumed_from"] == "1"
    assert cluster.requeues() == [str(JOB_ID)]  # finishing does not requeue
    assert (cluster.run_dir / "launches" / f"{JOB_ID}-0").is_dir()
    assert (cluster.run_dir / "launches" / f"{JOB_ID}-1").is_dir()


@pytest.mark.parametrize("requeue_on_term", ["0", "1"])
def test_term_is_forwarded_and_requeues_only_when_asked(cluster, requeue_on_term):
    proc = cluster.sbatch("--nodes=1", extra_env={"FAKE_TRAIN_MODE": "wait", "REQUEUE_ON_TERM": requeue_on_term},
                          background=True)
    result = _signal_batch_script(cluster, proc, signal.SIGTERM, 8)
    assert result.returncode == 75, result.stdout + cluster.job_log()
    assert all(r["signals"] == ["SIGTERM"] for r in cluster.ranks())
    assert cluster.requeues() == ([str(JOB_ID)] if requeue_on_term == "1" else [])


@pytest.mark.parametrize("code", [1, 3, 4])
def test_failure_is_not_requeued(cluster, code):
    result = cluster.sbatch("--nodes=2", extra_env={"FAKE_TRAIN_MODE": f"exit:{code}"})
    assert result.returncode == code
    assert cluster.requeues() == []
    assert f"training failed with exit code {code}: not requeuing" in cluster.job_log()


def test_requeue_cap(cluster):
    extra = {"FAKE_TRAIN_MODE": "exit:75", "FAKE_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}
    result = cluster.sbatch("--nodes=1", extra_env=extra)
    assert result.returncode == 75
    assert cluster.requeues() == []
    assert "already requeued 3 times (MAX_REQUEUES=3)" in cluster.job_log()

    extra["FAKE_RESTART_COUNT"] = "2"  # one below the cap: still requeued
    assert cluster.sbatch("--nodes=1", extra_env=extra).returncode == 75
    assert cluster.requeues() == [str(JOB_ID)]


def test_refused_requeue_is_reported(cluster):
    result = cluster.sbatch("--nodes=1", extra_env={"FAKE_TRAIN_MODE": "exit:75", "FAKE_REQUEUE_RC": "1"})
    assert result.returncode == 75
    assert "scontrol requeue 4242 failed: resubmit with RUN_DIR" in cluster.job_log()
