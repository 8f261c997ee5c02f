"""Process-group set-up from torchrun or SLURM, megatron's parallel_state, and seeds.

Rank discovery: torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else SLURM's SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID (one task per GPU, launched by srun), else a single process. MASTER_ADDR/MASTER_PORT
must be set for more than one process (the SLURM script exports them).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int


def discover_ranks(env: dict[str, str] | None = None) -> Ranks:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Ranks(0, 1, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (a single-process rendezvous, test worlds)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_gpu(verb: str = "pretrain", hint: str = "; `--dry-run` works without one") -> None:
    """Fails with one line before megatron is imported (its import prints pages of warnings on a CPU)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{verb} needs a CUDA GPU (none visible){hint}")


def check_layout_runs(cfg: RunConfig) -> None:
    """ConfigError for a layout the dry run plans but no GPU process can run yet (context parallelism)."""
    if cfg.parallel.context_parallel_size > 1:
        raise ConfigError(f"parallel.context_parallel_size={cfg.parallel.context_parallel_size}: the dry run plans "
                          "context parallelism (memory, layout, megatron's caps), but its training step (each rank's "
                          "share of every sequence, the loss over DP x CP, state passing for Mamba) has not run on "
                          "several GPUs yet: train with CP 1")


def initialize(cfg: RunConfig) -> Ranks:
    """Creates the default process group and megatron's TP/PP/DP groups; seeds every RNG."""
    import torch
    from megatron.core import parallel_state

    check_layout_runs(cfg)
    ranks = discover_ranks()
    require_gpu()
    if cfg.train.deterministic:
        enable_determinism()
    from hybrid_megatron.model.memory import data_parallel_size

    data_parallel_size(cfg, ranks.world_size, what="world size")  # fail before any collective
    torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
    if ranks.world_size > 1:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(f"{var} is not set: needed to connect {ranks.world_size} processes")
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a port nothing listens on: several single-GPU jobs share a node
            os.environ["MASTER_PORT"] = str(free_port())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl",
            rank=ranks.rank,
            world_size=ranks.world_size,
            timeout=timedelta(minutes=30),
            device_id=torch.device("cuda", torch.cuda.current_device()),
        )
    par = cfg.parallel
    from hybrid_megatron.model.pattern import virtual_pipeline_size

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(
            cfg.model.hybrid_layer_pattern, par.pipeline_model_parallel_size
        ),
        expert_model_parallel_size=par.expert_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
    )
    set_seeds(cfg.train.seed)
    return ranks


def enable_determinism() -> None:
    """``train.deterministic``: the same kernels and reduction orders in every process, so a resumed run
    repeats a straight one bit for bit.

    Mamba-2's SSD backward (mamba-ssm and megatron's varlen kernels) reduces with atomics and autotunes
    its Triton tiles by timing unless ``MAMBA_DETERMINISTIC=1``; both kernel sets read that when their
    modules are imported, so this runs before the model code is imported. With
    ``TRITON_CACHE_AUTOTUNING=1`` they would keep every tile and trust the on-disk autotuning cache:
    the first process on each machine picks by timing, so two machines (or two processes that tune at
    the same time) can pick different tiles and sum in a different order. That switch is dropped here,
    so every process runs the one fixed tile set.

    Attention with packed documents: see ``model.build.deterministic_attention_backend``.
    """
    import sys

    import torch

    os.environ.setdefault("NCCL_ALGO", "Ring")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"  # TE attention: deterministic backward
    os.environ["MAMBA_DETERMINISTIC"] = "1"  # SSD kernels: fixed tiles, ordered reductions
    if os.environ.pop("TRITON_CACHE_AUTOTUNING", None) == "1":
        log.warning("train.deterministic: TRITON_CACHE_AUTOTUNING=1 ignored; Mamba's Triton kernels use "
                    "their fixed tiles (a cached, timing-based choice can differ between machines)")
    torch.use_deterministic_algorithms(True, warn_only=True)  # torch ops: deterministic variants where they exist
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill of every torch.empty (slow)
    early = [m for m in ("mamba_ssm.ops.triton.ssd_combined", "megatron.core.ssm.ops.ssd_combined") if m in sys.modules]
    if early:
        log.warning("train.deterministic: %s was imported before determinism was enabled; its Triton "
                    "autotuning stays timing-based in this process", ", ".join(early))


def set_seeds(seed: int) -> None:
    """Same seed on every rank for data-independent RNG; megatron's tracker offsets TP/PP ranks."""
    import numpy as np
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    import torch
    from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
