"""Mamba-2's conv and SSD scan written as the recurrence they compute, token by token, in plain torch: the
reference that kernel-free tests compare against (slow; for sequences of tens of tokens).

    conv:  u_t = silu(bias + sum_j w[:, K-1-j] * x_{t-j})   over j where x_{t-j} is in t's document
    scan:  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  h = 0 at a document's first token;  y_t = h_t C_t + D x_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """x: [b, l, c], weight: [c, K], bias: [c], seq_idx: [b, l] -> silu(depthwise causal conv) [b, l, c]."""
    K = weight.shape[1]
    out = []
    for t in range(x.shape[1]):
        acc = bias.expand(x.shape[0], -1)
        for j in range(min(K, t + 1)):
            same = (seq_idx[:, t - j] == seq_idx[:, t]).to(x.dtype)[:, None]
            acc = acc + weight[:, K - 1 - j] * x[:, t - j] * same
        out.append(acc)
    return F.silu(torch.stack(out, dim=1))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
             seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [b, l, h, p], dt: [b, l, h], A, D: [h], B/C: [b, l, g, n] -> (y [b, l, h, p] with the D skip, last
    document's final state [b, h, p, n]), from a zero state."""
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        if t:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)[:, None, None, None]
            state = state * keep
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1) + x * D[:, None], state
