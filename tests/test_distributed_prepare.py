"""prepare-data --tasks N on datatrove's local executor: the same source for any task count, resumable,
a failed task named in one line."""

from __future__ import annotations

import hashlib
import json

import pytest
import zstandard

from data_helpers import random_docs, write_jsonl
from data_pipeline.shards import MemberReader, SourceIndex
from hybrid_megatron.cli import main


def _inputs(root, files=5):
    for i in range(files):
        write_jsonl(root / "raw" / f"part-{i}.jsonl", random_docs(100 + i, 60, 1500))
    return str(root / "raw" / "*.jsonl")


def _digest(out):
    """Every file of the source that a reader uses (shards, index, stats), by content."""
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".json"))
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}


def _prepare(inputs, out, tasks, workers=1, *extra):
    return main(["prepare-data", "--input", inputs, "--output", str(out), "--source", "web", "--tasks", str(tasks),
                 "--workers", str(workers), "--member-tokens", "65536", "--no-progress", *extra])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _inputs(tmp_path_factory.mktemp("dist"))


def test_one_task_and_four_give_the_same_source_byte_for_byte(inputs, tmp_path):
    assert _prepare(inputs, tmp_path / "one", 1) == 0
    assert _prepare(inputs, tmp_path / "four", 4, 2) == 0
    assert _digest(tmp_path / "one") == _digest(tmp_path / "four")
    ix = SourceIndex.open(tmp_path / "four", "web")
    reader = MemberReader(ix)
    assert sum(reader.read(m).size for m in range(ix.num_members)) == json.loads(
        (tmp_path / "four" / "stats.json").read_text())["tokens"]


def test_a_rerun_after_an_interruption_redoes_only_what_is_missing(inputs, tmp_path):
    clean = tmp_path / "clean"
    assert _prepare(inputs, clean, 3) == 0
    out = tmp_path / "resumed"
    assert _prepare(inputs, out, 3) == 0
    # as a kill -9 in the middle of file 2 leaves it: no record, a half shard, its task not completed
    (out / "parts" / "000002.json").unlink()
    (out / "index.json").unlink()
    (out / "part-000002-000000.tar").write_bytes(b"half a shard")
    (out / "parts" / "datatrove" / "completions" / "00002").unlink()
    kept = (out / "parts" / "000000.json").stat().st_mtime_ns
    assert _prepare(inputs, out, 3) == 0  # no --overwrite: it resumes
    assert (out / "parts" / "000000.json").stat().st_mtime_ns == kept  # a finished file is not redone
    assert _digest(out) == _digest(clean)


def test_a_failed_task_is_named_in_one_line_and_a_rerun_finishes(tmp_path, capsys):
    inputs = _inputs(tmp_path)
    bad = tmp_path / "raw" / "part-3.jsonl"
    whole = zstandard.ZstdCompressor().compress(bad.read_bytes())
    bad.unlink()
    zst = tmp_path / "raw" / "part-3.jsonl.zst"
    zst.write_bytes(whole[: len(whole) // 2])
    pattern = str(tmp_path / "raw" / "part-*")
    assert _prepare(pattern, tmp_path / "out", 2) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task 1 of 2 failed" in errors[0] and "part-3.jsonl.zst: truncated" in errors[0]
    assert not (tmp_path / "out" / "index.json").exists()
    zst.write_bytes(whole)  # the input fixed: the rerun finishes the failed task only
    assert _prepare(pattern, tmp_path / "out", 2) == 0
    assert SourceIndex.open(tmp_path / "out").num_members > 0
    assert inputs  # the jsonl inputs stayed where they were


def test_merge_alone_and_its_refusal(inputs, tmp_path, capsys):
    assert _prepare(inputs, tmp_path / "m", 2) == 0
    (tmp_path / "m" / "index.json").unlink()
    assert main(["prepare-data", "--merge", str(tmp_path / "m")]) == 0
    assert SourceIndex.open(tmp_path / "m").num_members > 0
    assert main(["prepare-data", "--merge", str(tmp_path)]) == 2
    assert "not a distributed prepare-data output" in capsys.readouterr().err


def _fake_slurm(bin_dir):
    """`sbatch` that only queues (prints a job id) and `scontrol` for the node list: the jobs are run by hand."""
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/usr/bin/env bash\necho "Submitted batch job $RANDOM"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def test_the_slurm_executor_submits_an_array_and_a_dependent_merge_that_build_the_same_source(inputs, tmp_path,
                                                                                              monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "slurm"
    assert _prepare(inputs, out, 3, 1, "--executor", "slurm", "--slurm-partition", "cpu") == 0
    script = (out / "parts" / "datatrove" / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=cpu" in script and "--requeue" in script
    assert not (out / "index.json").exists()  # queued, not run
    env = {**os.environ, "SLURM_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "RUN_OFFSET": "0", "SLURM_JOB_ID": "1"}
    launcher = str(Path(sys.executable).parent / "launch_pickled_pipeline")
    for job, ranks in (("datatrove", range(3)), ("merge", range(1))):  # what slurmd would run, in order
        for rank in ranks:
            subprocess.run([launcher, str(out / "parts" / job / "executor.pik")], check=True, timeout=300,
                           env={**env, "SLURM_ARRAY_TASK_ID": str(rank)}, capture_output=True)
    assert _prepare(inputs, tmp_path / "local", 1) == 0
    assert _digest(out) == _digest(tmp_path / "local")


def test_slurm_needs_a_partition_and_tasks(inputs, tmp_path, capsys):
    assert _prepare(inputs, tmp_path / "x", 2, 1, "--executor", "slurm") == 2
    assert "--executor slurm needs --slurm-partition" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_mid_run_then_a_rerun_completes_only_what_is_missing(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):  # ~2 s of tokenising each, so the kill lands inside the run
        (raw / f"big-{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor sit amet " * 300_000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hybrid_megatron", "prepare-data", "--input", str(raw / "*.txt"), "--output", str(out),
           "--source", "big", "--tasks", "4", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "parts" / "000000.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (out / "parts").glob("0*.json"))
    assert done_before and len(done_before) < 4, done_before  # killed mid-way
    assert not (out / "index.json").exists()
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run([*cmd[:cmd.index("--output") + 1], str(clean), *cmd[cmd.index("--output") + 2:]],
                          capture_output=True, timeout=300).returncode == 0
    assert _digest(out) == _digest(clean)
