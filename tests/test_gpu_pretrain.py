"""GPU: `hybrid-megatron pretrain` end to end in subprocesses: learning, exact resume, preemption.

Runs the tiny config on the sample data (built on first use). Each run is a fresh process, as on a
cluster, so these tests check what users get: exit codes, `latest`, losses.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_helpers import ROOT, pretrain_env, run_pretrain

pytestmark = pytest.mark.gpu

STEPS = 40
# short runs: warm up within them, and deterministic kernels so the resumed half can match bitwise
DETERMINISTIC = ["train.deterministic=true", "logging.log_interval=10", "schedule.lr_warmup_steps=10"]


def _losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_resume_continues_the_same_curve(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [f"train.train_steps={STEPS}", *DETERMINISTIC]
    _ok(run_pretrain(["configs/tiny.yaml", *common, f"logging.run_dir={straight}"]))
    _ok(run_pretrain(["configs/tiny.yaml", *common, f"logging.run_dir={split}", f"train.exit_after_steps={STEPS // 2}"]))
    assert (split / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS // 2:06d}"
    _ok(run_pretrain(["configs/tiny.yaml", *common, f"logging.run_dir={split}"]))
    a, b = _losses(straight), _losses(split)
    assert sorted(b) == list(range(1, STEPS + 1)), "a step was repeated or skipped across the resume"
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert a[step]["tokens"] == b[step]["tokens"]
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-3, abs=0), step
    bitwise = all(a[s]["loss"] == b[s]["loss"] for s in range(STEPS // 2 + 1, STEPS + 1))
    (tmp_path / "resume_report.json").write_text(json.dumps({"bitwise": bitwise, "straight": a, "resumed": b}))
    print(f"resume bitwise equal: {bitwise}")
    # train.deterministic pins every kernel family (NCCL, cuBLAS, TE attention, Mamba SSD): bit for bit
    differing = [s for s in range(STEPS // 2 + 1, STEPS + 1) if a[s]["loss"] != b[s]["loss"]]
    assert not differing, f"resumed losses differ from the straight run's at steps {differing[:5]}"
    # configs/tiny.yaml validates at the end of the run: once in each, the same windows, the same weights
    val = {name: [json.loads(line) for line in (d / "val.jsonl").read_text().splitlines()]
           for name, d in (("straight", straight), ("split", split))}
    assert [r["step"] for r in val["straight"]] == [r["step"] for r in val["split"]] == [STEPS], val
    assert val["straight"][0]["loss"] == val["split"][0]["loss"]
    assert val["straight"][0]["tokens"] == val["split"][0]["tokens"] <= 262144  # fewer where a source is small
    assert set(val["split"][0]["loss_by_source"]) == {"code_val", "tests_val"}


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """Starts pretrain with its output in <run_dir>.log (a pipe nobody reads would fill and block it)."""
    env = pretrain_env()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{run_dir}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid_megatron", "pretrain", "configs/tiny.yaml", f"logging.run_dir={run_dir}",
         "logging.log_interval=1", *extra],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    proc.log_path = Path(log.name)
    return proc


def _output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()[-4000:]


def _signal_state(pid: int) -> str:
    """The signal masks of the process and its threads (/proc), for a failure message."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        lines.append(f"{status.get('Name', '?').strip()}[{task.name}] " + " ".join(
            f"{k}={status.get(k, '?').strip()}" for k in ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")))
    return "\n".join(lines)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}):\n{_output(proc)}")
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {predicate.__doc__ or 'the run'}:\n"
                                 f"{_output(proc)}")
        time.sleep(0.05)


def test_sigusr1_checkpoints_and_exits_75(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    losses = run_dir / "losses.jsonl"
    _wait_for(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 5, proc)
    proc.send_signal(signal.SIGUSR1)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        masks = _signal_state(proc.pid)
        proc.kill()
        proc.wait()
        noted = [line for line in proc.log_path.read_text().splitlines() if "SIGUSR1" in line]
        raise AssertionError(f"no exit within 180 s of SIGUSR1 (SIGUSR1 is bit 10); log lines naming it: {noted}\n"
                             f"{masks}\n{_output(proc)}") from None
    assert proc.returncode == 75, _output(proc)
    assert "received SIGUSR1" in proc.log_path.read_text()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "train_state.json").read_text())
    assert state["step"] == len(losses.read_text().splitlines())
    assert latest == f"step-{state['step']:06d}"


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    proc = _start(run_dir, "checkpoint.save_interval=5")
    # wait for the first commit, then kill -9 as soon as the second save has started writing
    _wait_for(lambda: (ckpts / "latest").exists(), proc)
    first = (ckpts / "latest").read_text().strip()
    def second_save_started_or_done():
        """the second save to start writing"""
        return (any(p.name.startswith("step-") and p.name.endswith(".tmp") for p in ckpts.iterdir())
                or (ckpts / "latest").read_text().strip() != first)

    _wait_for(second_save_started_or_done, proc)
    proc.kill()
    proc.wait()
    caught = [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert caught, f"the second save finished before the kill (polled every 50 ms): {sorted(os.listdir(ckpts))}"
    assert (ckpts / "latest").read_text().strip() in {first, "step-000010"}
    target = ckpts / (ckpts / "latest").read_text().strip()
    assert (target / "train_state.json").is_file() and (target / "run_config.yaml").is_file()
    # and a restart resumes from it and finishes a few more steps
    proc = run_pretrain(["configs/tiny.yaml", f"logging.run_dir={run_dir}", "train.exit_after_steps=3"])
    _ok(proc)
    assert "resumed from" in proc.stderr


def test_saved_initial_weights_start_another_run_identically(tmp_path):
    """checkpoint.save_initial writes the init as a weights-only step 0; a run with another seed that
    loads it trains the same curve (the optimizer's fp32 main params must follow the loaded weights, or
    every step after the first trains the discarded init), unlike the same seed-999 run alone."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["configs/tiny.yaml", "train.train_steps=4", *DETERMINISTIC, "schedule.lr_warmup_steps=2"]
    _ok(run_pretrain([*common, f"logging.run_dir={a}", "checkpoint.save_initial=true"]))
    init = a / "checkpoints" / "step-000000"
    assert json.loads((init / "train_state.json").read_text()) == {"step": 0, "weights_only": True}
    _ok(run_pretrain([*common, f"logging.run_dir={b}", "train.seed=999", f"checkpoint.load={init}"]))
    _ok(run_pretrain([*common, f"logging.run_dir={c}", "train.seed=999"]))
    curves = {name: [_losses(d)[s]["loss"] for s in range(1, 5)] for name, d in (("a", a), ("b", b), ("c", c))}
    assert curves["b"] == curves["a"], curves
    assert curves["c"][0] != curves["a"][0], curves


def test_the_quickstart_checkpoint_exports_without_flags(tmp_path):
    """A pretrain run on the bytes sample data records its tokenizer: to-hf then needs no flag and writes
    tokenizer files with the data pipeline's ids."""
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    _ok(run_pretrain(["configs/tiny.yaml", "train.train_steps=6", "schedule.lr_warmup_steps=2",
                      f"logging.run_dir={run}"]))
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((step / "data_tokenizer.json").read_text())["kind"] == "bytes"
    import torch

    rng = torch.load(step / "rng" / "rank-00000.pt", weights_only=True)  # stored for the safe loader
    assert {"python", "numpy", "torch", "tracker", "cuda"} <= set(rng)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "hybrid_megatron", "convert", "to-hf", str(run / "checkpoints"),
                           str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=pretrain_env())
    _ok(proc)
    text = "naïve 東京"
    assert AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
