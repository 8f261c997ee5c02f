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


def test_cached_autotuning_is_dropped_so_every_process_runs_the_fixed_tiles():
    code = ("import os\nfrom hybrid_megatron.training.distributed import enable_determinism\nenable_determinism()\n"
            "print(os.environ.get('TRITON_CACHE_AUTOTUNING', 'unset'))\n")
    env = {**os.environ, "TRITON_CACHE_AUTOTUNING": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["unset"]
    assert "TRITON_CACHE_AUTOTUNING=1 ignored" in proc.stderr


def test_a_users_nccl_and_cublas_choices_are_kept():
    code = ("import os\nfrom hybrid_megatron.training.distributed import enable_determinism\nenable_determinism()\n"
            "print(os.environ['NCCL_ALGO'], os.environ['CUBLAS_WORKSPACE_CONFIG'])\n")
    env = {**os.environ, "NCCL_ALGO": "Tree", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Tree", ":16:8"]




def _backend(*overrides):
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.model.build import transformer_config_kwargs

    return transformer_config_kwargs(load_run_config(ROOT / "configs" / "tiny.yaml", list(overrides)))["attention_backend"]


def test_packed_deterministic_runs_leave_cudnn_thd_attention():
    """cuDNN's deterministic thd backward wants ~128*B*H*S^2 bytes (64 GiB at the tiny config's batches):
    megatron gets FlashAttention-2 where flash-attn is installed, else TE's unfused attention."""
    import importlib.util

    from megatron.core.transformer.enums import AttnBackend

    expected = AttnBackend.flash if importlib.util.find_spec("flash_attn") else AttnBackend.unfused
    assert _backend("train.deterministic=true") == expected
    assert _backend() == AttnBackend.auto
    assert _backend("train.deterministic=true", "data.reset_at_document_boundaries=false") == AttnBackend.auto
    assert _backend("train.deterministic=true", "model.attention_backend=fused") == AttnBackend.fused  # the user's choice


def test_attention_switches_in_the_environment_that_megatron_would_refuse_are_named(monkeypatch):
    import pytest
    from megatron.core.transformer.enums import AttnBackend

    from data_pipeline.errors import ConfigError
    from hybrid_megatron.model.build import check_attention_env

    for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.delenv(var, raising=False)
    check_attention_env(AttnBackend.auto)
    monkeypatch.setenv("NVTE_FUSED_ATTN", "1")
    check_attention_env(AttnBackend.fused)  # agrees: fine
    with pytest.raises(ConfigError, match=r"NVTE_FUSED_ATTN=1 in the environment conflicts with attention backend unfused"):
        check_attention_env(AttnBackend.unfused)
    monkeypatch.setenv("NVTE_FUSED_ATTN", "0")
    with pytest.raises(ConfigError, match="NVTE_FUSED_ATTN=0 .* backend auto"):
        check_attention_env(AttnBackend.auto)
    with pytest.raises(ConfigError, match="model.attention_backend"):
        _backend("model.attention_backend=cudnn")
