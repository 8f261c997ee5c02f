"""CPU checks of tools/loss_parity.py's command line: plan, compare and run (without GPUs, and with the GPU
launch replaced where the test says so), concurrent runs sharing out GPUs and memory, the exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_megatron.devtools import REPO_ROOT as ROOT
from parity_records import loss_records, ok_run
from tools import loss_parity as L


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "loss_parity.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def _runs_file(path: Path, runs: dict, steps: int = 20) -> Path:
    path.write_text(json.dumps({"suite": "fp8", "steps": steps, "runs": runs}))
    return path


def test_plan_lists_the_commands_and_bad_names_exit_2():
    proc = _cli("plan", "parallel")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["name"] for r in rows] == [r.name for r in L.SUITES["parallel"].runs]
    two = next(r for r in rows if r["name"] == "tp2-sp")
    assert "--nproc-per-node=2" in two["command"] and "configs/tiny.yaml" in two["command"]
    proc = _cli("plan", "parallel", "--runs", "tp1,tp9")
    assert proc.returncode == 2 and "unknown ['tp9']" in proc.stderr


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_plan_into_a_reader_that_left_ends_without_a_traceback(unbuffered):
    """`plan fp8 | head -1` and a reader gone before the first line: no BrokenPipeError traceback
    (line by line with PYTHONUNBUFFERED, else in one flush at the end)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    cmd = f"'{sys.executable}' '{ROOT / 'tools' / 'loss_parity.py'}' plan fp8"
    head = subprocess.run(f"{cmd} | head -1", shell=True, capture_output=True, text=True, timeout=120, env=env)
    assert len(head.stdout.splitlines()) == 1 and json.loads(head.stdout)["name"] == "bf16"
    gone = subprocess.run(f"{cmd} | true", shell=True, capture_output=True, text=True, timeout=120, env=env)
    for proc in (head, gone):
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_compare_merges_files_later_wins_and_sets_the_exit_code(tmp_path):
    good = loss_records(range(1, 21))  # the fp8 suite compares after its 10 warm-up steps
    first = _runs_file(tmp_path / "a.json", {"bf16": ok_run(good), "fp8-tensorwise": ok_run(loss_records(
        range(1, 21), loss=lambda s: (5.0 - 0.01 * s) * 1.05))})
    second = _runs_file(tmp_path / "b.json", {"fp8-tensorwise": ok_run(good)})
    proc = _cli("compare", "fp8", str(first), "--out", str(tmp_path / "o1"))
    assert proc.returncode == 1 and "FAIL" in proc.stdout
    proc = _cli("compare", "fp8", str(first), str(second), "--out", str(tmp_path / "o2"))
    assert proc.returncode == 0, proc.stdout
    rows = {r["run"]: r for r in json.loads((tmp_path / "o2" / "fp8_parity.json").read_text())["rows"]}
    assert rows["fp8-tensorwise"]["verdict"] == "pass" and rows["fp8-delayed"]["verdict"] == "not run"
    other = _runs_file(tmp_path / "c.json", {}, steps=30)
    proc = _cli("compare", "fp8", str(first), str(other))
    assert proc.returncode != 0 and "steps=30" in proc.stderr


def test_run_without_gpus_records_skips_and_fails(tmp_path):
    proc = _cli("run", "parallel", "--runs", "tp1,tp2-sp", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    runs = json.loads((tmp_path / "o" / "parallel_runs.json").read_text())["runs"]
    assert runs["tp1"] == {"status": "skipped", "error": "needs 1 GPUs, 0 visible"}
    assert runs["tp2-sp"]["error"] == "needs 2 GPUs, 0 visible"
    rows = json.loads((tmp_path / "o" / "parallel_parity.json").read_text())["rows"]
    assert {r["run"]: r["verdict"] for r in rows}["tp2-sp"] == "skipped"


def test_a_failing_run_is_recorded_with_its_log_and_its_dependents_skip(tmp_path, monkeypatch, capsys):
    """The real CLI on this CPU machine exits 2 ('needs a CUDA GPU'): the driver records that, with the
    log tail, and does not start runs that would start from the failed run's weights."""
    monkeypatch.setattr(L, "visible_gpus", lambda: 2)
    code = L.main(["run", "parallel", "--runs", "tp1,tp2-sp", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert code == 1
    runs = json.loads((tmp_path / "o" / "parallel_runs.json").read_text())["runs"]
    assert runs["tp1"]["status"] == "failed" and runs["tp1"]["exit"] == 2
    assert "needs a CUDA GPU" in runs["tp1"]["log_tail"]
    assert runs["tp2-sp"] == {"status": "skipped", "error": "needs a finished tp1 run first"}
    log = (tmp_path / "w" / "parallel" / "tp1.log").read_text()
    assert log.splitlines()[0].endswith("checkpoint.save_final=false")  # the command line heads the log


def test_concurrent_runs_share_out_the_gpus(tmp_path, monkeypatch):
    """--concurrent 3 on two GPUs: three runs at once, slots on GPUs 0, 1, 0; each row says so."""
    import threading
    import time

    lock, active, seen = threading.Lock(), [0], []

    def fake_execute(suite, run, steps, work, timeout, results, gpu=None):
        with lock:
            active[0] += 1
            seen.append((run.name, gpu, active[0]))
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return ok_run(loss_records(range(1, steps + 1)))

    monkeypatch.setattr(L, "visible_gpus", lambda: 2)
    monkeypatch.setattr(L, "gpu_memory_bytes", lambda: 10**12)  # ample: the memory check passes
    monkeypatch.setattr(L, "execute", fake_execute)
    code = L.main(["run", "fp8", "--runs", "bf16,bf16-repeat,fp8-tensorwise", "--steps", "20", "--concurrent", "3",
                   "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert code == 0
    assert max(n for _, _, n in seen) == 3 and sorted(g for _, g, _ in seen) == [0, 0, 1]
    runs = json.loads((tmp_path / "o" / "fp8_runs.json").read_text())["runs"]
    assert set(runs) == {"bf16", "bf16-repeat", "fp8-tensorwise"}
    assert all(r["concurrent"] == 3 and r["gpu"] in (0, 1) for r in runs.values())


def test_a_freed_gpu_takes_the_next_run(tmp_path, monkeypatch):
    """--concurrent 2 on two GPUs: the third run goes to the GPU whose run ended, not to the busy one."""
    import time

    order = []

    def fake_execute(suite, run, steps, work, timeout, results, gpu=None):
        order.append((run.name, gpu))
        time.sleep(0.6 if gpu == 0 else 0.1)  # the run on GPU 1 ends first
        return ok_run(loss_records(range(1, steps + 1)))

    monkeypatch.setattr(L, "visible_gpus", lambda: 2)
    monkeypatch.setattr(L, "gpu_memory_bytes", lambda: 10**12)  # ample: the memory check passes
    monkeypatch.setattr(L, "execute", fake_execute)
    L.main(["run", "fp8", "--runs", "bf16,bf16-repeat,fp8-tensorwise", "--steps", "20", "--concurrent", "2",
            "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert order == [("bf16", 0), ("bf16-repeat", 1), ("fp8-tensorwise", 1)]


H100_BYTES, H200_BYTES = 81559 * 2**20, 143771 * 2**20  # nvidia-smi's memory.total


def test_concurrent_runs_must_fit_the_gpu_memory_together(tmp_path, monkeypatch, capsys):
    """Two 1B runs on one H100 ran out of memory (each held ~39 GiB): the estimate refuses them up front."""
    suite = L.SUITES["fp8"]
    runs = [r for r in suite.runs if r.name in ("bf16", "fp8-tensorwise-bf16ends")]
    problem = L.memory_problem(suite, runs, 300, tmp_path, 2, 1, H100_BYTES)
    assert problem and "2 runs would share a 86 GB GPU" in problem and "use --concurrent 1" in problem
    assert L.memory_problem(suite, runs, 300, tmp_path, 3, 1, H200_BYTES) is None  # ~45 GB each
    assert L.memory_problem(suite, runs, 300, tmp_path, 2, 2, H100_BYTES) is None  # one run a GPU
    assert L.memory_problem(suite, runs, 300, tmp_path, 2, 1, 0) is None  # no nvidia-smi: nothing to judge

    monkeypatch.setattr(L, "visible_gpus", lambda: 1)
    monkeypatch.setattr(L, "gpu_memory_bytes", lambda: H100_BYTES)
    monkeypatch.setattr(L, "execute", lambda *a, **k: pytest.fail("a run started"))
    code = L.main(["run", "fp8", "--runs", "bf16,fp8-tensorwise", "--concurrent", "2",
                   "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert code == 2 and "error: --concurrent 2: 2 runs would share" in capsys.readouterr().err


def test_concurrent_is_refused_where_runs_must_not_share_a_gpu_or_depend_on_each_other(tmp_path):
    out = ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    proc = _cli("run", "7b-layers", "--concurrent", "2", *out)
    assert proc.returncode == 2 and "compares tokens/s" in proc.stderr
    proc = _cli("run", "parallel", "--runs", "tp1,tp2-sp", "--concurrent", "2", *out)
    assert proc.returncode == 2 and "tp2-sp use several GPUs" in proc.stderr
    proc = _cli("run", "fp8", "--concurrent", "0", *out)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr


def test_concurrent_refuses_a_run_that_starts_from_another_selected_run(monkeypatch, capsys):
    a, b = L.Run("a", 1, ("checkpoint.save_initial=true",)), L.Run("b", 1, (), reference="a", init_from="a")
    monkeypatch.setitem(L.SUITES, "fp8", L.Suite("fp8", "configs/tiny.yaml", (), (a, b), default_steps=10))
    with pytest.raises(SystemExit) as exc:
        L.parse_args(["run", "fp8", "--concurrent", "2"])
    assert exc.value.code == 2 and "run b starts from run a" in capsys.readouterr().err
    assert [r.name for r in L.parse_args(["run", "fp8", "--runs", "b", "--concurrent", "2"]).selected] == ["b"]


def test_run_time_limit_defaults_to_the_suites_and_must_be_positive(capsys):
    # fp8-64k's runs took 280-370 s on an H200: the 300 s that suits the others would cut them off
    assert L.parse_args(["run", "fp8"]).timeout_s == 300.0
    assert L.parse_args(["run", "fp8-64k"]).timeout_s == L.SUITES["fp8-64k"].run_timeout_s == 540.0
    assert L.parse_args(["run", "fp8-64k", "--timeout-s", "90"]).timeout_s == 90.0
    with pytest.raises(SystemExit) as exc:
        L.parse_args(["run", "fp8", "--timeout-s", "0"])
    assert exc.value.code == 2 and "--timeout-s 0: must be > 0" in capsys.readouterr().err
