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


def _fused_attn_after(packed: bool, env: dict) -> str:
    code = ("import os\nfrom hybrid_megatron.training.distributed import enable_determinism\n"
            f"enable_determinism(packed_documents={packed})\nprint(os.environ.get('NVTE_FUSED_ATTN', 'unset'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_packed_documents_turn_off_cudnn_thd_attention_unless_the_user_chose():
    """cuDNN's deterministic thd backward wants ~128*B*H*S^2 bytes (64 GiB at the tiny config's batches)."""
    env = {k: v for k, v in os.environ.items() if k != "NVTE_FUSED_ATTN"}
    assert _fused_attn_after(True, env) == "0"
    assert _fused_attn_after(False, env) == "unset"
    assert _fused_attn_after(True, {**env, "NVTE_FUSED_ATTN": "1"}) == "1"
