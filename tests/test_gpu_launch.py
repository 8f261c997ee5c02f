"""hybrid_megatron/devtools/gpu_launch.py: child processes with a log, a timeout that takes the whole process group, progress."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hybrid_megatron.devtools import gpu_launch as G


def test_exit_code_and_log(tmp_path):
    code, tail = G.launch(1, ["-c", "import sys; print('hello from the child'); sys.exit(3)"], 60, tmp_path / "a.log")
    assert code == 3 and "hello from the child" in tail
    first = (tmp_path / "a.log").read_text().splitlines()[0]
    assert first.startswith(sys.executable) and first.endswith("sys.exit(3)")


def test_timeout_kills_the_process_group_and_reports_progress(tmp_path):
    # the child starts a grandchild (as torchrun starts ranks); both must be gone after the timeout
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(60)\n")
    ticks = []
    start = time.monotonic()
    code, _ = G.launch(1, ["-c", script], 2.0, tmp_path / "b.log", progress=ticks.append, every_s=0.5)
    assert code == 124 and time.monotonic() - start < 20
    assert ticks and all(0 < t < 2.5 for t in ticks)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{grandchild}/stat").read_text().split()[2] if Path(f"/proc/{grandchild}/stat").exists() else "X"
        if state == "Z":  # a zombie waiting for its (killed) parent's reaper is dead already
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{grandchild}").exists() or state == "Z"


def _gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split()[2] == "Z":  # a zombie is dead already
            return True
        time.sleep(0.1)
    return False


def test_workers_left_behind_by_a_finished_child_are_killed_and_env_is_passed(tmp_path):
    # a compile pool or loader worker that outlives its parent keeps the GPU's memory: it must not survive
    pid_file = tmp_path / "orphan.pid"
    script = ("import os, subprocess, sys\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('knob', os.environ['EXTRA_KNOB'])\n")
    code, tail = G.launch(1, ["-c", script], 30, tmp_path / "c.log", env={"EXTRA_KNOB": "on"})
    assert code == 0 and "knob on" in tail
    assert _gone(int(pid_file.read_text()))


def test_command_for_several_gpus_uses_torchrun():
    cmd = G.launch_command(2, ["-m", "hybrid_megatron", "pretrain", "x.yaml"])
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert G.launch_command(1, ["a.py"]) == [sys.executable, "a.py"]
