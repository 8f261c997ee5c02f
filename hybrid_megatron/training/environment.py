"""The software and device a number was measured with: recorded beside every result (eval results,
benchmarks, fixtures), so that a table can say what produced it."""

from __future__ import annotations

import platform

PACKAGES = ("torch", "megatron-core", "transformer-engine", "transformer_engine_torch", "mamba-ssm",
            "causal-conv1d", "transformers", "lm_eval")


def versions() -> dict:
    """Python's and the installed versions of ``PACKAGES`` (None where one is missing)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
