"""State-passing context parallelism for Mamba-2: the degree is not capped by the number of heads.

megatron-core's Mamba context parallelism is all-to-all over heads, so CP can be at most Mamba heads / TP. Here
every CP rank keeps all heads and a share of the sequence instead. The sequence is cut into chunks (one per rank,
or megatron's load-balancing zigzag for attention: rank r holds chunks r and 2*cp-1-r). Each chunk runs the
layer's own kernels from a zero state, and three exact corrections make the result the full sequence's:

1. conv halo: the causal depthwise convolution of chunk k needs the last ``kernel - 1`` conv inputs of chunk k-1,
   held by whichever rank holds it (every chunk's tail is all-gathered: small);
2. state passing: each chunk's final state from zero (S_k) and its pass-through decay (P_k = exp(A * sum of its
   dt), 0 when a document starts inside it) are all-gathered, and the state entering chunk k is
   H_k = P_{k-1} H_{k-1} + S_{k-1}, H_0 = 0: a scan over the chunks, of [batch, heads, head_dim, state] tensors;
3. correction: H_k reaches the tokens of chunk k before its first document boundary, and the SSM is linear in
   its state, so y_t += exp(A * cumsum(dt)_t) * C_t . H_k there.

Packed documents: ``seq_idx`` numbers documents over the whole sequence (before the split), so a state or a halo
stops at a boundary whichever rank it crosses to. The gathers carry gradients (an all-reduce of the gathered
gradients, which gloo and NCCL both have), so one backward pass through the layer is exact too.

Which chunks a rank holds is a ``Layout``: whole rows in CP chunks or megatron's zigzag of 2 x CP (``Layout.rows``),
or packed documents each split into 2 x CP chunks, megatron's per-document split (``Layout.documents``: chunk
ids run document by document, so the same recurrence crosses from one document's last chunk to the next one's
first, where ``seq_idx`` stops it).

The kernels come in as callables: the CPU tests pass the token-by-token reference (``tests/ssd_reference.py``);
on a GPU, ``model/mamba_cp_mixer.py`` passes causal-conv1d's ``causal_conv1d_fn`` and mamba-ssm's
``mamba_chunk_scan_combined`` (with ``seq_idx`` and ``return_final_states``; ``kernel_conv``, ``kernel_scan``):

- ``conv(x, seq_idx) -> x``: causal depthwise conv + activation over [batch, length, channels], not crossing
  documents;
- ``scan(x, dt, A, B, C, D, seq_idx) -> (y, final_state)``: the SSD scan from a zero state with dt already
  processed (bias, softplus) and the D skip (in the kernel's fp32, as megatron's fused path has it, so D's
  gradient is fp32 too); the final state is the last document's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def chunk_ids(cp_rank: int, cp_size: int, zigzag: bool) -> tuple[int, ...]:
    """The chunks of the sequence one CP rank holds, in the order its tokens are laid out."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"CP rank {cp_rank} outside a CP group of {cp_size}")
    return (cp_rank, 2 * cp_size - 1 - cp_rank) if zigzag else (cp_rank,)


class _GatherBySum(torch.autograd.Function):
    """Every rank's ``x`` stacked on a new first dim, by an all-reduce of a stack that holds only this rank's slot:
    all-reduce is the one collective gloo also has for CUDA tensors (so CP ranks can share one GPU in a test), and
    what is gathered here is small (conv tails, final states). Backward all-reduces the stacked gradients and keeps
    this rank's slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_zeros((dist.get_world_size(group), *x.shape))
        out[dist.get_rank(group)] = x
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


@dataclass(frozen=True)
class Layout:
    """Which chunks of the sequence each CP rank holds, in the order of its tokens (``ids[rank]``, the same count
    on every rank), and each chunk's length (``lengths[chunk id]``); chunk ids number the chunks in sequence order."""

    ids: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]

    @classmethod
    def rows(cls, cp: int, zigzag: bool, local_tokens: int) -> Layout:
        """Whole rows split into CP chunks, or megatron's zigzag of 2 x CP (``chunk_ids``)."""
        n = 2 if zigzag else 1
        if local_tokens % n:
            raise ValueError(f"{local_tokens} tokens do not split into this rank's {n} chunks")
        return cls(tuple(chunk_ids(r, cp, zigzag) for r in range(cp)), (local_tokens // n,) * (n * cp))

    @classmethod
    def documents(cls, cp: int, doc_lengths: list[int]) -> Layout:
        """megatron's split of packed documents (Transformer Engine's ``thd_get_partitioned_indices``): every
        document in 2 x CP chunks, rank r holding chunks r and 2 x CP - 1 - r of each, documents in order."""
        if bad := [n for n in doc_lengths if n % (2 * cp)]:
            raise ValueError(f"documents of {bad[:3]} tokens do not split into 2 x CP = {2 * cp} chunks")
        ids = tuple(tuple(d * 2 * cp + k for d in range(len(doc_lengths)) for k in chunk_ids(r, cp, True))
                    for r in range(cp))
        return cls(ids, tuple(n // (2 * cp) for n in doc_lengths for _ in range(2 * cp)))

    @property
    def slots(self) -> tuple[tuple[int, int], ...]:
        """Where chunk k lies in a gather of every rank's chunks: (rank, position among that rank's), in chunk
        order."""
        where = sorted((k, (r, i)) for r, ids in enumerate(self.ids) for i, k in enumerate(ids))
        assert [k for k, _ in where] == list(range(len(where))), "chunks are numbered 0, 1, ... in sequence order"
        return tuple(w for _, w in where)


def gather_chunks(local: torch.Tensor, layout: Layout, group) -> dict[int, torch.Tensor]:
    """``local`` stacks one tensor per chunk this rank holds (``layout.ids`` order): -> every chunk's, by chunk id.
    When ``local`` requires grad, every rank must use the result in its output (each backward is a collective)."""
    gathered = _GatherBySum.apply(local, group)
    return {k: gathered[r, i] for k, (r, i) in enumerate(layout.slots)}


@dataclass(frozen=True)
class Dims:
    heads: int
    head_dim: int
    groups: int  # B/C groups; heads share them in contiguous blocks
    state: int
    conv_kernel: int

    @property
    def channels(self) -> int:  # the conv's inputs: x, B, C
        return self.heads * self.head_dim + 2 * self.groups * self.state

    def split(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv outputs [b, l, channels] -> x [b, l, heads, head_dim], B and C [b, l, groups, state]."""
        x, B, C = torch.split(u, [self.heads * self.head_dim, self.groups * self.state, self.groups * self.state], -1)
        return (x.unflatten(-1, (self.heads, self.head_dim)), B.unflatten(-1, (self.groups, self.state)),
                C.unflatten(-1, (self.groups, self.state)))


def with_halo(x: torch.Tensor, seq_idx: torch.Tensor, tail: torch.Tensor, tail_idx: torch.Tensor):
    """Chunk inputs with the previous chunk's last conv inputs in front: the conv then sees what it would in the
    whole sequence (halo positions of another document are masked by ``seq_idx`` like any boundary)."""
    return torch.cat([tail, x], dim=1), torch.cat([tail_idx, seq_idx], dim=1)


def entering_states(finals: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
    """H_k = P_{k-1} H_{k-1} + S_{k-1} over every chunk in order, H_0 = 0. finals S: [chunks, b, h, s] (s = head_dim x
    state, flattened), passes P: [chunks, b, h] -> H: [chunks, b, h, s]."""
    states = [torch.zeros_like(finals[0])]
    for k in range(1, finals.shape[0]):
        states.append(passes[k - 1][..., None] * states[k - 1] + finals[k - 1])
    return torch.stack(states)


class EnteringStates(torch.autograd.Function):
    """This rank's chunks' entering states from every chunk's gathered final state and decay (``entering_states``).
    Autograd through the recursion would keep every chunk's state of the sequence, [b, h, head_dim, state] fp32
    each, on every rank; this keeps only its input (the gathered summaries, alive anyway) and recomputes the
    states in the backward, which runs the recursion in reverse: dS_{k-1} = G_k, dP_{k-1} = <G_k, H_{k-1}>,
    G_{k-1} = dH_{k-1} + P_{k-1} G_k."""

    @staticmethod
    def forward(ctx, gathered: torch.Tensor, where: tuple, wanted: tuple, heads: int) -> torch.Tensor:
        """gathered: [ranks, chunks per rank, b, h s + h] (each chunk's S flattened, then P); where[k]: the (rank,
        slot) of chunk k; wanted: this rank's chunk ids -> their H, [len(wanted), b, h, s]."""
        ctx.save_for_backward(gathered)
        ctx.where, ctx.wanted, ctx.heads = where, wanted, heads
        return entering_states(*EnteringStates._summaries(gathered, where, heads))[list(wanted)]

    @staticmethod
    def _summaries(gathered: torch.Tensor, where: tuple, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        ordered = gathered[[r for r, _ in where], [i for _, i in where]]  # [chunks, b, h s + h], in chunk order
        b, width = ordered.shape[1], ordered.shape[2] - heads
        return ordered[..., :width].reshape(len(where), b, heads, -1), ordered[..., width:]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gathered,) = ctx.saved_tensors
        finals, passes = EnteringStates._summaries(gathered, ctx.where, ctx.heads)
        states = entering_states(finals, passes)
        d_finals, d_passes = torch.zeros_like(finals), torch.zeros_like(passes)
        incoming = torch.zeros_like(states)
        incoming[list(ctx.wanted)] = grad.to(states.dtype)
        g = incoming[-1]
        for k in range(finals.shape[0] - 1, 0, -1):  # g: the gradient of H_k
            d_finals[k - 1] = g
            d_passes[k - 1] = (g * states[k - 1]).sum(-1)
            g = incoming[k - 1] + passes[k - 1][..., None] * g
        d = torch.zeros_like(gathered)
        width = d.shape[-1] - ctx.heads
        for k, (r, i) in enumerate(ctx.where):
            d[r, i, :, :width] = d_finals[k].flatten(1)
            d[r, i, :, width:] = d_passes[k]
        return d, None, None, None


def mamba_state_passing(xbc: torch.Tensor, dt: torch.Tensor, seq_idx: torch.Tensor, A: torch.Tensor,
                        D: torch.Tensor, dims: Dims, layout: Layout, group, *,
                        conv: Callable, scan: Callable) -> torch.Tensor:
    """One CP rank's Mamba-2 core (conv through the SSD scan and D skip, before gating) over its chunks.

    xbc: [b, L, channels] conv inputs, dt: [b, L, heads] processed, seq_idx: [b, L] global document ids; the rank's
    chunks one after another along L in ``layout.ids[rank]`` order, ``layout.lengths`` long; ``group`` is the CP
    group, its ranks the CP ranks. Returns y: [b, L, heads, head_dim].
    """
    ids = layout.ids[dist.get_rank(group)]
    sizes = [layout.lengths[k] for k in ids]
    if sum(sizes) != xbc.shape[1]:
        raise ValueError(f"{xbc.shape[1]} tokens are not this rank's {len(ids)} chunks of {sum(sizes)} tokens")
    k_1 = dims.conv_kernel - 1
    xs, dts, idxs = (t.split(sizes, dim=1) for t in (xbc, dt, seq_idx))
    if min(sizes) < k_1:
        raise ValueError(f"chunks of {min(sizes)} tokens are shorter than the conv halo ({k_1})")
    # 1. conv halo: the previous chunk's last conv inputs and their document ids
    tails = gather_chunks(torch.stack([x[:, x.shape[1] - k_1:] for x in xs]), layout, group)
    tail_idx = gather_chunks(torch.stack([i[:, i.shape[1] - k_1:] for i in idxs]), layout, group)
    finals, passes, local = [], [], []
    for k, x, d, idx in zip(ids, xs, dts, idxs):
        if k == 0:  # nothing before the sequence: a halo of zeros adds nothing to the conv (0 * a gathered tail,
            # so that this rank's output hangs off the gather and its backward runs here too); no entering state
            tail, t_idx = tails[0] * 0, idx[:, :1].expand(-1, k_1)
            carried = torch.zeros_like(idx, dtype=torch.bool)
        else:
            tail, t_idx = tails[k - 1], tail_idx[k - 1]
            carried = idx == t_idx[:, -1:]  # [b, l]: tokens in the entering state's document (a prefix)
        x_h, idx_h = with_halo(x, idx, tail, t_idx)
        xi, B, C = dims.split(conv(x_h, idx_h)[:, k_1:])
        y, final = scan(xi, d, A, B, C, D, idx)
        acc = torch.promote_types(d.dtype, torch.float32)  # decays in fp32 at least
        decay = torch.exp(A.to(acc) * torch.cumsum(d.to(acc), dim=1))  # [b, l, h]
        passes.append(torch.where(carried.all(dim=1)[:, None], decay[:, -1], torch.zeros_like(decay[:, -1])))
        finals.append(final)
        local.append((y, C, decay * carried[..., None]))
    # 2. state passing over every chunk of the sequence: one collective (its backward's order is the same on every
    # rank), then this rank's chunks' entering states
    summary = torch.cat([torch.stack(finals).flatten(2), torch.stack(passes).to(finals[0].dtype)], dim=2)
    gathered = _GatherBySum.apply(summary, group)  # [ranks, chunks per rank, b, h p n + h]
    states = EnteringStates.apply(gathered, layout.slots, tuple(ids), dims.heads)
    b = finals[0].shape[0]
    # 3. the entering state's share of each token's output
    ys = [y + EnteringShare.apply(C, H.view(b, dims.heads, dims.head_dim, dims.state), reach).to(y.dtype)
          for (y, C, reach), H in zip(local, states)]
    return torch.cat(ys, dim=1)


class EnteringShare(torch.autograd.Function):
    """out[b, l, h, p] = reach[b, l, h] * sum_n C[b, l, g(h), n] H[b, h, p, n], in reach's dtype (fp32 at least), the
    heads in contiguous blocks per group. Saves only its inputs (C is a view of the conv output the scan keeps
    anyway) and recomputes the product in the backward: autograd through an einsum of C expanded to the heads would
    keep an fp32 [b, l, h, n] copy of C and the fp32 [b, l, h, p] product, per layer, about as much as the layer's
    other activations together."""

    @staticmethod
    def _share(C: torch.Tensor, H: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        b, g, n = C.shape[0], C.shape[2], C.shape[3]
        Hg = H.to(acc).view(b, g, H.shape[1] // g, H.shape[2], n)  # [b, g, r, p, n]
        return torch.einsum("blgn,bgrpn->blgrp", C.to(acc), Hg).flatten(2, 3)  # [b, l, h, p]

    @staticmethod
    def forward(ctx, C: torch.Tensor, H: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(C, H, reach)
        return EnteringShare._share(C, H, reach.dtype) * reach[..., None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        C, H, reach = ctx.saved_tensors
        acc = reach.dtype
        b, l, g, n = C.shape
        h, p = H.shape[1], H.shape[2]
        grad = grad.to(acc)
        d_reach = (grad * EnteringShare._share(C, H, acc)).sum(-1) if ctx.needs_input_grad[2] else None
        d_share = (grad * reach[..., None]).view(b, l, g, h // g, p)  # [b, l, g, r, p]
        d_C = d_H = None
        if ctx.needs_input_grad[0]:
            Hg = H.to(acc).view(b, g, h // g, p, n)
            d_C = torch.einsum("blgrp,bgrpn->blgn", d_share, Hg).to(C.dtype)
        if ctx.needs_input_grad[1]:
            d_H = torch.einsum("blgrp,blgn->bgrpn", d_share, C.to(acc)).reshape(b, h, p, n).to(H.dtype)
        return d_C, d_H, d_reach


def process_dt(dt: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """softplus(dt + bias), in fp32 at least: what megatron's MambaMixer has its training kernel do to dt (its dt
    limits are the kernel's default, (0, inf), which softplus never leaves)."""
    acc = torch.promote_types(dt.dtype, torch.float32)
    return F.softplus(dt.to(acc) + dt_bias.to(acc))


def kernel_conv(weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "silu") -> Callable:
    """The ``conv`` callable on a GPU: causal-conv1d's kernel, as megatron's MambaMixer calls it (weight [c, K]),
    in the channel-last layout its ``seq_idx`` needs."""
    from causal_conv1d import causal_conv1d_fn

    def conv(x: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
        out = causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx.to(torch.int32).contiguous(),
                               activation=activation)
        return out.transpose(1, 2)

    return conv


def kernel_scan(chunk_size: int) -> Callable:
    """The ``scan`` callable on a GPU: mamba-ssm's chunked SSD kernel from a zero state, dt already processed, with
    the D skip."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    def scan(x, dt, A, B, C, D, seq_idx):
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D,
                                         seq_idx=seq_idx.to(torch.int32).contiguous(), dt_softplus=False,
                                         return_final_states=True)

    return scan
