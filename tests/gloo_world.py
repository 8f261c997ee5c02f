"""Megatron process groups over CPU gloo ranks, for tests of code that runs collectives: ``run_ranks(body)``
spawns the ranks, gives each a megatron world (TP ``tp``, CP ``cp``, PP 1, the rest data parallel) and returns
what the bodies put into the shared ``out`` dict. ``body(rank, out)`` must be a module-level function (it is pickled)."""

from __future__ import annotations

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from hybrid_megatron.training.distributed import free_port


def _rank_main(rank: int, world: int, port: int, tp: int, cp: int, body, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tp, 1, context_parallel_size=cp)
    try:
        body(rank, out)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_ranks(body, world: int = 2, tp: int = 1, cp: int = 1) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(world, free_port(), tp, cp, body, out), nprocs=world, join=True)
        return dict(out)
