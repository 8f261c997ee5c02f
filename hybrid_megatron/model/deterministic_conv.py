"""Deterministic gradients for the Mamba-2 short convolution's weight and bias (``train.deterministic``).

mamba-ssm's fused Mamba-2 layer (``mamba_split_conv1d_scan_combined``, what megatron-core trains with)
takes its convolution backward from causal-conv1d. That kernel writes ``dx`` directly, but it sums
``dweight`` and ``dbias`` over the batch and over chunks of the sequence with float
``atomicAdd``: the order of the additions, and so the last bits of the sums, change from run to run.
``MAMBA_DETERMINISTIC`` covers mamba-ssm's own Triton kernels, not this one, and causal-conv1d has no
deterministic mode; so a resumed run could not repeat a straight one bit for bit.

:func:`install` wraps the backward that mamba-ssm calls: causal-conv1d still computes ``dx``, and
:func:`conv1d_param_grads` recomputes ``dweight``/``dbias`` with ordinary (deterministic) torch
reductions in fp32, from the same inputs, honouring document boundaries (``seq_idx``) and the SiLU.
It costs a few extra elementwise passes over the conv input per Mamba layer: for verification runs.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def conv1d_param_grads(x, weight, bias, dout, seq_idx, silu: bool):
    """``dweight`` [D, W] and ``dbias`` [D] (fp32; dbias None without a bias) of a causal depthwise conv.

    x, dout: [B, D, L] (any strides); weight: [D, W]; seq_idx: [B, L] int or None (a tap that reaches
    into another document, or before the sequence start, contributes nothing); silu: the conv output
    went through SiLU, so ``dout`` is scaled by SiLU's derivative at the recomputed pre-activation.
    """
    import torch

    width = weight.shape[-1]
    xf = x.float()
    w = weight.float()
    shifted = []  # shifted[k][b, d, t] = x[b, d, t - k] inside the same document, else 0
    for k in range(width):
        if k == 0:
            shifted.append(xf)
            continue
        s = torch.zeros_like(xf)
        if k < xf.shape[-1]:
            s[..., k:] = xf[..., :-k]
            if seq_idx is not None:
                same = torch.zeros_like(seq_idx, dtype=torch.bool)
                same[:, k:] = seq_idx[:, k:] == seq_idx[:, :-k]
                s = s * same.unsqueeze(1)
        shifted.append(s)
    grad = dout.float()
    if silu:
        pre = torch.zeros_like(xf) if bias is None else bias.float()[None, :, None].expand_as(xf).clone()
        for k in range(width):  # tap w = width - 1 - k multiplies x[t - k], as in the kernel
            pre = pre + w[None, :, width - 1 - k, None] * shifted[k]
        sig = torch.sigmoid(pre)
        grad = grad * sig * (1.0 + pre * (1.0 - sig))
    dweight = torch.stack([(shifted[width - 1 - j] * grad).sum(dim=(0, 2)) for j in range(width)], dim=-1)
    dbias = grad.sum(dim=(0, 2)) if bias is not None else None
    return dweight.reshape(weight.shape), dbias


def wrap_backward(original):
    def deterministic_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                                 return_dinitial_states, silu_activation):
        dx_out, _, _, *rest = original(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                                       return_dinitial_states, silu_activation)
        if initial_states is not None:  # never in training: taps into the initial state would be missing here
            raise RuntimeError("deterministic conv1d backward: initial_states are not supported")
        dweight, dbias = conv1d_param_grads(x, weight, bias, dout, seq_idx, silu_activation)
        # the kernel's contract: gradients in the parameters' dtype (it sums in fp32 and casts too)
        dweight = dweight.to(weight.dtype)
        dbias = None if dbias is None else dbias.to(bias.dtype)
        return (dx_out, dweight, dbias, *rest)

    deterministic_conv1d_bwd.wrapped = original
    return deterministic_conv1d_bwd


def install() -> bool:
    """Routes mamba-ssm's fused Mamba-2 backward through :func:`conv1d_param_grads` (idempotent).
    Returns False where mamba-ssm or causal-conv1d is not installed (nothing to make deterministic)."""
    import importlib

    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return False
    current = getattr(module, "causal_conv1d_bwd_function", None)
    if current is None:
        return False
    if not hasattr(current, "wrapped"):
        module.causal_conv1d_bwd_function = wrap_backward(current)
        log.info("train.deterministic: Mamba conv1d weight/bias gradients by ordered reductions "
                 "(causal-conv1d sums them with atomics)")
    return True
