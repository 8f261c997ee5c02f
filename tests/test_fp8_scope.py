"""The BF16-inside-FP8 linear wrapper (model/fp8_scope.py) on a plain module: the mechanism, not TE.

The real Transformer Engine classes are checked on the GPU (tests/test_gpu_model.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from hybrid_megatron.model.fp8_scope import bf16_forward

STATE = {"fp8": True}


@contextmanager
def _fp8_off():
    previous, STATE["fp8"] = STATE["fp8"], False
    try:
        yield
    finally:
        STATE["fp8"] = previous


class Linear(torch.nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((2,), 3.0))
        self.fail = fail

    def forward(self, x, scale=1.0):
        if self.fail:
            raise RuntimeError("kernel failed")
        return x * self.weight * scale, STATE["fp8"]


def test_forward_runs_with_fp8_off_and_the_state_comes_back():
    cls = bf16_forward(Linear, _fp8_off)
    module = cls()
    out, fp8_during = module(torch.ones(2), scale=2.0)
    assert fp8_during is False and STATE["fp8"] is True
    assert torch.equal(out, torch.full((2,), 6.0))
    out.sum().backward()
    assert torch.equal(module.weight.grad, torch.full((2,), 2.0))


def test_same_parameters_and_keys_as_the_base_class():
    cls = bf16_forward(Linear, _fp8_off)
    module = cls()
    assert isinstance(module, Linear) and cls.__name__ == "BF16Linear"
    assert list(module.state_dict()) == list(Linear().state_dict()) == ["weight"]


def test_state_is_restored_when_the_forward_raises():
    module = bf16_forward(Linear, _fp8_off)(fail=True)
    with pytest.raises(RuntimeError, match="kernel failed"):
        module(torch.ones(2))
    assert STATE["fp8"] is True
