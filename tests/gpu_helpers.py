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


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run's losses.jsonl."""
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


def straight_and_resumed(common: list[str], root: Path, steps: int) -> tuple[dict[int, float], dict[int, float]]:
    """Losses of a straight run of ``steps`` and of one stopped half way (``train.exit_after_steps``) and resumed,
    both with the pretrain arguments ``common``; asserts every step ran exactly once in the resumed run. The
    straight run and the first half run at the same time (two processes on the GPU): two runs' wall time, not 3."""
    from concurrent.futures import ThreadPoolExecutor

    straight, split = root / "straight", root / "split"
    first = ([f"logging.run_dir={straight}"], [f"logging.run_dir={split}", f"train.exit_after_steps={steps // 2}"])
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda args: run_pretrain([*common, f"train.train_steps={steps}", *args]), first))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_pretrain([*common, f"train.train_steps={steps}", f"logging.run_dir={split}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = losses(straight), losses(split)
    assert sorted(b) == list(range(1, steps + 1)), "a step was repeated or skipped across the resume"
    return a, b
