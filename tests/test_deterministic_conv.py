"""The deterministic Mamba conv1d weight/bias gradients (model/deterministic_conv.py) against autograd
through an independent reference: each document convolved on its own with torch's conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron.model.deterministic_conv import conv1d_param_grads, wrap_backward, install


def _reference(x, weight, bias, dout, seq_idx, silu):
    """autograd through per-document causal conv1d (groups = channels, left padding width - 1)."""
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    width = w.shape[-1]
    total = 0.0
    for row in range(x.shape[0]):
        ids = seq_idx[row] if seq_idx is not None else torch.zeros(x.shape[-1], dtype=torch.long)
        bounds = torch.nonzero(torch.diff(ids)).flatten().tolist()
        for start, end in zip([0] + [i + 1 for i in bounds], [i + 1 for i in bounds] + [x.shape[-1]]):
            seg = x[row:row + 1, :, start:end]
            out = F.conv1d(F.pad(seg, (width - 1, 0)), w.unsqueeze(1), b, groups=x.shape[1])
            out = F.silu(out) if silu else out
            total = total + (out * dout[row:row + 1, :, start:end]).sum()
    total.backward()
    return w.grad, (None if b is None else b.grad)


@pytest.mark.parametrize("silu,with_bias,packed", [(True, True, True), (True, True, False), (False, False, True)])
def test_param_grads_match_autograd(silu, with_bias, packed):
    g = torch.Generator().manual_seed(0)
    bsz, dim, length, width = 2, 6, 37, 4
    x = torch.randn(bsz, dim, length, generator=g, dtype=torch.float64)
    weight = torch.randn(dim, width, generator=g, dtype=torch.float64)
    bias = torch.randn(dim, generator=g, dtype=torch.float64) if with_bias else None
    dout = torch.randn(bsz, dim, length, generator=g, dtype=torch.float64)
    seq_idx = None
    if packed:  # documents of 1, 2, 11, ... tokens: taps must stop at every boundary
        seq_idx = torch.tensor([[0] * 5 + [1] * 1 + [2] * 2 + [3] * 29, [0] * 20 + [1] * 17], dtype=torch.int32)
    want_w, want_b = _reference(x, weight, bias, dout, seq_idx, silu)
    got_w, got_b = conv1d_param_grads(x, weight, bias, dout, seq_idx, silu)
    # the recompute runs in fp32 like the CUDA kernel: fp32 rounding against the float64 reference
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(got_b.double(), want_b, rtol=1e-5, atol=1e-5)
    else:
        assert got_b is None
    again_w, _ = conv1d_param_grads(x, weight, bias, dout, seq_idx, silu)
    assert torch.equal(again_w, got_w)


def test_the_wrapper_keeps_dx_and_replaces_the_atomic_sums():
    calls = []

    def kernel(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinit, silu):
        calls.append(silu)
        return "dx from the kernel", "atomic dweight", "atomic dbias", None

    x, weight, bias, dout = torch.randn(1, 3, 9), torch.randn(3, 4), torch.randn(3), torch.randn(1, 3, 9)
    wrapped = wrap_backward(kernel)
    dx, dweight, dbias, dinit = wrapped(x, weight, bias, dout, None, None, None, None, False, True)
    assert dx == "dx from the kernel" and dinit is None and calls == [True]
    want_w, want_b = conv1d_param_grads(x, weight, bias, dout, None, True)
    assert torch.equal(dweight, want_w) and torch.equal(dbias, want_b)
    assert wrapped.wrapped is kernel
    # bf16 parameters get bf16 gradients, as from the kernel (the sums stay fp32 until the cast)
    wb, bb = weight.bfloat16(), bias.bfloat16()
    _, dweight16, dbias16, _ = wrapped(x.bfloat16(), wb, bb, dout.bfloat16(), None, None, None, None, False, True)
    want_w16, want_b16 = conv1d_param_grads(x.bfloat16(), wb, bb, dout.bfloat16(), None, True)
    assert dweight16.dtype == dbias16.dtype == torch.bfloat16 and want_w16.dtype == torch.float32
    assert torch.equal(dweight16, want_w16.bfloat16()) and torch.equal(dbias16, want_b16.bfloat16())
    with pytest.raises(RuntimeError, match="initial_states"):
        wrapped(x, weight, bias, dout, None, torch.zeros(1, 3, 3), None, None, False, True)


def test_install_without_mamba_ssm_is_a_no_op():
    import importlib.util

    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba-ssm is installed here: tests/test_gpu_model.py covers the installed kernel")
    assert install() is False
