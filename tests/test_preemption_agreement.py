"""Preemption agreement across ranks (training/signals.py) with real processes and a gloo process group:
a signal that reaches one rank makes every rank stop at the same step; the previous handlers come back."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist
import torch.multiprocessing as mp

from hybrid_megatron.training.distributed import free_port

from hybrid_megatron.training.signals import PreemptionHandler

WORLD = 3
SIGNALLED_RANK, SIGNAL_AT_STEP = 1, 4



def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    before = signal.getsignal(signal.SIGUSR1)
    stopped_at = None
    with PreemptionHandler() as handler:
        for step in range(1, 10):
            if rank == SIGNALLED_RANK and step == SIGNAL_AT_STEP:
                os.kill(os.getpid(), signal.SIGUSR1)  # only this rank gets the signal
            if handler.agreed():
                stopped_at = step
                break
    results[rank] = (stopped_at, handler.received, signal.getsignal(signal.SIGUSR1) is before)
    dist.destroy_process_group()


def test_one_signalled_rank_stops_every_rank_at_the_same_step():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), results), nprocs=WORLD, join=True)
        got = dict(results)
    assert {r: got[r][0] for r in range(WORLD)} == {r: SIGNAL_AT_STEP for r in range(WORLD)}
    assert got[SIGNALLED_RANK][1] == signal.SIGUSR1 and got[0][1] is None and got[2][1] is None
    assert all(got[r][2] for r in range(WORLD)), "the previous SIGUSR1 handler was not restored"


def test_signals_blocked_by_the_launcher_still_reach_training(tmp_path):
    """A blocked mask survives fork and exec: with SIGUSR1 blocked by the parent, a notice would stay
    pending forever. The handler unblocks it on entry (and blocks it again on exit)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import os, signal\n"
        "from hybrid_megatron.training.signals import PreemptionHandler\n"
        "with PreemptionHandler() as h:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    got = h.received\n"
        "print(got == signal.SIGUSR1, signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
    )

    def block_usr1():
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])

    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, preexec_fn=block_usr1, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"], proc.stdout + proc.stderr
    assert "SIGUSR1 arrived blocked" in proc.stderr


def test_a_handler_replaced_by_native_code_is_reinstalled():
    """Native code calling sigaction() (here libc's signal(), setting SIG_IGN) replaces Python's handler
    without signal.getsignal noticing: rearm() sees the kernel's handler change and re-installs ours."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with PreemptionHandler() as handler:
        libc.signal(int(signal.SIGUSR1), 1)  # SIG_IGN, behind Python's back
        assert signal.getsignal(signal.SIGUSR1) == handler._handle  # Python cannot tell
        assert handler.rearm() == ["SIGUSR1"]
        assert handler.rearm() == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1
