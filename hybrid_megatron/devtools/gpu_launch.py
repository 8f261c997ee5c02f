"""Launching GPU work from the tool drivers: child processes (one, or one per GPU under torchrun) and
what the machine has. The drivers themselves never touch CUDA, so a failed or hung run cannot take
them down: each launch has a timeout and leaves its full output in a log file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT as ROOT


def launch_command(n: int, argv: list[str]) -> list[str]:
    """``argv`` (a script path or ``-m module ...``) as one process, or ``n`` under torch.distributed.run."""
    if n == 1:
        return [sys.executable, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *argv]


def launch(n: int, argv: list[str], timeout: float, log_path: Path,
           progress: Callable[[float], None] | None = None, every_s: float = 30.0,
           env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """Runs ``argv`` in ``n`` processes from ``cwd`` (the repo root), whose code comes first on PYTHONPATH;
    returns (exit code, output tail).

    The command line is the log's first line; exit code 124 means the timeout killed it. The processes
    run in their own session, which is killed as a whole on a timeout or when this process is interrupted:
    torchrun's ranks and any worker they forked (compile pools, loader workers) would otherwise hold the
    GPU's memory after the parent is gone. ``progress(elapsed_s)`` is called every ``every_s`` while it
    runs; ``env`` adds variables.
    """
    cmd = launch_command(n, argv)
    env = {**os.environ, **(env or {})}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(cwd), *filter(None, [env.get("PYTHONPATH")])]))
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code = None
        try:
            while code is None:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    code = 124
                    break
                try:
                    code = proc.wait(timeout=min(every_s, left))
                except subprocess.TimeoutExpired:
                    if progress is not None:
                        progress(time.monotonic() - start)
        finally:
            kill_session(proc)
    return code, log_path.read_text()[-2500:]


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to the session ``proc`` leads (started with ``start_new_session``), then reaps ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _nvidia_smi(*args: str) -> str:
    """nvidia-smi's standard output, or "" when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def device_name() -> str:
    lines = _nvidia_smi("-L").strip().splitlines()
    return lines[0] if lines else "unknown"


def visible_gpus() -> int:
    return sum(1 for line in _nvidia_smi("-L").splitlines() if line.startswith("GPU "))


def gpu_memory_bytes() -> int:
    """The smallest visible GPU's memory (0 when nvidia-smi does not answer)."""
    mib = [int(x) for x in _nvidia_smi("--query-gpu=memory.total", "--format=csv,noheader,nounits").split()
           if x.isdigit()]
    return min(mib) * 2**20 if mib else 0
