"""Preemption agreement across ranks (training/signals.py) with real processes and a gloo process group:
a signal that reaches one rank makes every rank stop at the same step; the previous handlers come back."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist
import torch.multiprocessing as mp

from hybrid_megatron.convert.ckpt_io import free_port

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
