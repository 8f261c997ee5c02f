"""Shared set-up for GPU tests: a single-process megatron world and small configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(*overrides: str):
    from hybrid_megatron.config import load_run_config

    return load_run_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def init_single_process(seed: int = 1234, tp: int = 1, pp: int = 1) -> None:
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        torch.cuda.set_device(0)
        # an in-memory store: one process needs no rendezvous port (parallel test workers raced for them)
        torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def pretrain_env() -> dict[str, str]:
    """The environment of a pretrain subprocess, as a fresh job gets it: without the NVTE_*_ATTN switches
    that megatron writes into this process's os.environ when a test here builds a model (a later pretrain
    with another attention backend would refuse them, rightly, as a user's conflicting setting)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def run_pretrain(args: list[str], timeout: int = 900, **popen) -> subprocess.CompletedProcess:
    """`python -m hybrid_megatron pretrain ...` from the repo root; output captured."""
    env = pretrain_env()
    return subprocess.run(
        [sys.executable, "-m", "hybrid_megatron", "pretrain", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen,
    )
