"""mamba-ssm's Triton SSD kernels on the CPU, in Triton's interpreter (``TRITON_INTERPRET=1``): the real kernels'
semantics (``seq_idx``, final states, their gradients) checked without a GPU, slowly (seconds per call).

Three things in the kernels' host code assume a CUDA device, and ``interpreted()`` covers each while it is open:
``torch.cuda.device(index)`` around the launches (a no-op for CPU tensors), ``get_device_properties(...)
.multi_processor_count`` (it only sizes a grid split, summed afterwards), and the autotuner, which times its
configurations with CUDA events (the first configuration is taken instead). ``mamba_ssm/__init__.py`` loads the
CUDA selective-scan extension, so ``load`` imports the Triton submodules without running it. Where CUDA is
present nothing is patched.

The Python sources are enough: ``python tools/mamba_sources.py DIR`` writes the pinned release's into DIR (CI does
this), or a mamba-ssm source checkout; put DIR on ``PYTHONPATH``. causal-conv1d's kernel is CUDA only, so the
interpreted checks take the reference convolution."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from unittest import mock

SM_COUNT = 132  # an H100/H200's; only how the work is split depends on it


def skip_reason() -> str | None:
    """Why the interpreted kernels cannot run here, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "runs mamba-ssm's Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1"
    if importlib.util.find_spec("triton") is None:
        return "needs triton (Triton's interpreter runs the kernels on the CPU)"
    if importlib.util.find_spec("mamba_ssm") is None:
        return "needs mamba-ssm's Python sources on PYTHONPATH (python tools/mamba_sources.py DIR writes them)"
    return None


def load(module: str = "ssd_combined"):
    """``mamba_ssm.ops.triton.<module>`` (the chunked scan, or ``layernorm_gated``: megatron's gated RMSNorm)
    without ``mamba_ssm/__init__.py`` (which loads a CUDA extension)."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
    return importlib.import_module(f"mamba_ssm.ops.triton.{module}")


@contextlib.contextmanager
def interpreted():
    """The CUDA assumptions of the kernels' host code covered on a machine without CUDA (see the module doc)."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "device", lambda *_: contextlib.nullcontext()))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties",
                                              lambda *_: types.SimpleNamespace(multi_processor_count=SM_COUNT)))
        stack.enter_context(mock.patch.object(Autotuner, "prune_configs",
                                              lambda self, *args: prune(self, *args)[:1]))
        load()
        yield
