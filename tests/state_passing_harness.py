"""One CP rank's check of model/ssm_state_passing.py against the whole sequence, shared by the CPU test (the
token-by-token reference, float64), the GPU test (causal-conv1d's and mamba-ssm's kernels, float32; CP ranks
sharing one GPU over gloo) and the interpreted test (mamba-ssm's SSD kernel in Triton's interpreter on the CPU,
the reference conv, float32). ``body`` runs inside ``tests/gloo_world.run_ranks(..., cp=CP)``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from hybrid_megatron.model.ssm_state_passing import (Dims, Layout, kernel_conv, kernel_scan, mamba_state_passing,
                                                     process_dt)
from ssd_reference import causal_conv, ssd_scan

PARAMS = ("conv_w", "conv_b", "dt_bias", "A_log", "D")


@dataclass(frozen=True)
class Backend:
    dims: Dims
    chunk: int  # tokens per CP chunk
    device: str
    dtype: torch.dtype
    scan_chunk: int = 0  # the SSD kernel's chunk size; 0: the reference scan


REFERENCE = Backend(Dims(heads=4, head_dim=3, groups=2, state=5, conv_kernel=4), chunk=6, device="cpu",
                    dtype=torch.float64)
KERNELS = Backend(Dims(heads=8, head_dim=32, groups=2, state=32, conv_kernel=4), chunk=64, device="cuda",
                  dtype=torch.float32, scan_chunk=32)
# CP chunks of 24 tokens, not a multiple of the kernel's 16: kernel chunks straddle CP chunks and documents
INTERPRETED = Backend(Dims(heads=4, head_dim=16, groups=2, state=16, conv_kernel=4), chunk=24, device="cpu",
                      dtype=torch.float32, scan_chunk=16)


def _doc_ids(length: int, starts: list[int]) -> torch.Tensor:
    ids = torch.zeros(length, dtype=torch.long)
    for s in starts:
        ids[s:] += 1
    return ids


def inputs(be: Backend, n_chunks: int, packed: bool) -> dict:
    """The same global tensors on every rank: two rows of ``n_chunks`` chunks."""
    L, c = n_chunks * be.chunk, be.chunk
    if packed:  # a start on a chunk's first token, one inside the next chunk's halo, a one-token document, a
        # document over more than a whole chunk (its state passes through one untouched)
        rows = [[c, c + 2, 2 * c + 1, 2 * c + 2], [1, L - c - 1]]
        seq_idx = torch.stack([_doc_ids(L, [s for s in r if s < L]) for r in rows])
    else:
        seq_idx = torch.zeros(2, L, dtype=torch.long)
    return _tensors(be, seq_idx)


def document_inputs(be: Backend, doc_lengths: list[int]) -> dict:
    """One packed row (thd: batch 1) of documents of these lengths, one after another."""
    starts = torch.tensor(doc_lengths).cumsum(0)[:-1].tolist()
    return _tensors(be, _doc_ids(sum(doc_lengths), starts)[None])


def _tensors(be: Backend, seq_idx: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(0)
    (b, L), d = seq_idx.shape, be.dims

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(be.device, be.dtype)

    return {"xbc": randn(b, L, d.channels), "dt": randn(b, L, d.heads), "seq_idx": seq_idx.to(be.device),
            "weights": randn(b, L, d.heads, d.head_dim),
            "conv_w": randn(d.channels, d.conv_kernel, scale=0.5), "conv_b": randn(d.channels, scale=0.1),
            "dt_bias": randn(d.heads, scale=0.5), "A_log": randn(d.heads, scale=0.5), "D": randn(d.heads)}


def _kernels(be: Backend, p: dict):
    """causal-conv1d's kernel on a GPU (it is CUDA only), mamba-ssm's scan wherever ``scan_chunk`` is set."""
    conv = kernel_conv(p["conv_w"], p["conv_b"]) if be.device == "cuda" else partial(_reference_conv, p["conv_w"],
                                                                                      p["conv_b"])
    return conv, kernel_scan(be.scan_chunk) if be.scan_chunk else ssd_scan


def _reference_conv(weight, bias, x, seq_idx):
    return causal_conv(x, weight, bias, seq_idx)


def whole(be: Backend, xbc, dt_raw, seq_idx, p) -> torch.Tensor:
    """The whole sequence on one rank: what every CP rank's share must equal."""
    conv, scan = _kernels(be, p)
    x, B, C = be.dims.split(conv(xbc, seq_idx))
    y, _ = scan(x, process_dt(dt_raw, p["dt_bias"]), -torch.exp(p["A_log"]), B, C, p["D"], seq_idx)
    return y


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def body(rank: int, out, be: Backend, zigzag: bool, packed: bool, documents: list[int] | None = None) -> None:
    """Max differences, CP rank against the whole sequence: outputs, input and parameter gradients. ``documents``:
    one packed row of documents of these lengths in units of 2 x CP, split one document at a time
    (``Layout.documents``) instead of whole rows."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if be.device == "cuda":
        torch.cuda.set_device(0)
    group, cp = ps.get_context_parallel_group(), ps.get_context_parallel_world_size()
    if documents is None:
        data = inputs(be, 2 * cp if zigzag else cp, packed)
        layout = Layout.rows(cp, zigzag, (2 if zigzag else 1) * be.chunk)
    else:
        doc_lengths = [2 * cp * n for n in documents]
        data, layout = document_inputs(be, doc_lengths), Layout.documents(cp, doc_lengths)
    starts = [0, *torch.tensor(layout.lengths).cumsum(0).tolist()]
    ids = layout.ids[ps.get_context_parallel_rank()]
    ref_p = {k: data[k].clone().requires_grad_() for k in PARAMS}
    ref_in = {k: data[k].clone().requires_grad_() for k in ("xbc", "dt")}
    y_ref = whole(be, ref_in["xbc"], ref_in["dt"], data["seq_idx"], ref_p)
    (y_ref * data["weights"]).sum().backward()

    index = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in ids]).to(be.device)
    p = {k: data[k].clone().requires_grad_() for k in PARAMS}
    local = {k: data[k][:, index].clone().requires_grad_() for k in ("xbc", "dt")}
    conv, scan = _kernels(be, p)
    y = mamba_state_passing(local["xbc"], process_dt(local["dt"], p["dt_bias"]), data["seq_idx"][:, index],
                            -torch.exp(p["A_log"]), p["D"], be.dims, layout, group, conv=conv, scan=scan)
    (y * data["weights"][:, index]).sum().backward()
    for k in PARAMS:  # megatron sums parameter gradients over the CP ranks (the DP x CP reduction)
        dist.all_reduce(p[k].grad, group=group)
    scale = {"y": y_ref, **{f"grad_{k}": ref_in[k].grad for k in local}, **{f"grad_{k}": ref_p[k].grad for k in PARAMS}}
    diff = {"y": _max_diff(y, y_ref[:, index]),
            **{f"grad_{k}": _max_diff(local[k].grad, ref_in[k].grad[:, index]) for k in local},
            **{f"grad_{k}": _max_diff(p[k].grad, ref_p[k].grad) for k in PARAMS}}
    out[rank] = {"diff": diff, "scale": {k: float(v.abs().max()) for k, v in scale.items()}}
