"""Launching GPU work from the tool drivers: child processes (one, or one per GPU under torchrun) and
what the machine has. The drivers themselves never touch CUDA, so a failed or hung run cannot take
them down: each launch has a timeout and leaves its full output in a log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_command(n: int, argv: list[str]) -> list[str]:
    """``argv`` (a script path or ``-m module ...``) as one process, or ``n`` under torch.distributed.run."""
    if n == 1:
        return [sys.executable, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *argv]


def launch(n: int, argv: list[str], timeout: float, log_path: Path) -> tuple[int, str]:
    """Runs ``argv`` in ``n`` processes from the repo root; returns (exit code, output tail).

    The command line is the log's first line; exit code 124 means the timeout killed it.
    """
    cmd = launch_command(n, argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, log_path.read_text()[-2500:]


def device_name() -> str:
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def visible_gpus() -> int:
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU ")) if proc.returncode == 0 else 0
