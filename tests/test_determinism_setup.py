"""train.deterministic switches every kernel family to its deterministic path (the flags, checked on a CPU;
the bitwise resume that depends on them is tests/test_gpu_pretrain.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_enable_determinism_sets_every_switch():
    code = (
        "import os, torch\n"
        "from hybrid_megatron.training.distributed import enable_determinism\n"
        "enable_determinism()\n"
        "print(os.environ['MAMBA_DETERMINISTIC'], os.environ['NVTE_ALLOW_NONDETERMINISTIC_ALGO'],\n"
        "      os.environ['NCCL_ALGO'], os.environ['CUBLAS_WORKSPACE_CONFIG'],\n"
        "      torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),\n"
        "      torch.utils.deterministic.fill_uninitialized_memory)\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAMBA_DETERMINISTIC", "NVTE_ALLOW_NONDETERMINISTIC_ALGO", "NCCL_ALGO", "CUBLAS_WORKSPACE_CONFIG")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "0", "Ring", ":4096:8", "True", "True", "False"]


def test_a_users_nccl_and_cublas_choices_are_kept():
    code = ("import os\nfrom hybrid_megatron.training.distributed import enable_determinism\nenable_determinism()\n"
            "print(os.environ['NCCL_ALGO'], os.environ['CUBLAS_WORKSPACE_CONFIG'])\n")
    env = {**os.environ, "NCCL_ALGO": "Tree", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Tree", ":16:8"]
