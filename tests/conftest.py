"""Test set-up: GPU tests skip with a reason where CUDA or the GPU kernels are absent."""

from __future__ import annotations

import importlib.util

import pytest


def _gpu_skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible)"
    for module in ("mamba_ssm", "causal_conv1d"):
        if importlib.util.find_spec(module) is None:
            return f"needs the GPU kernels: {module} is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords or "multigpu" in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_skip_reason()
    if reason is None:
        import torch

        if torch.cuda.device_count() < 2:
            for item in gpu_items:
                if "multigpu" in item.keywords:
                    item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))
