"""State passing with mamba-ssm's real SSD kernel, without a GPU: the kernel runs in Triton's interpreter on the CPU
(``tests/triton_interpreter.py``), the conv is the reference (causal-conv1d is CUDA only). What the state passing
relies on in the kernel (a document's state stops at ``seq_idx`` boundaries, the final state is the last
document's from zero, the gradient flows back through that final state, the D skip) is checked against the
token-by-token reference, then two CP ranks against the whole sequence through the same kernel, forward and
backward, then what the state-passing mixer's core keeps for its backward (with megatron's gated RMSNorm,
mamba-ssm's Triton kernel too) against the dry run's memory model, on rows and on packed documents.

``python tools/mamba_sources.py DIR``, then ``TRITON_INTERPRET=1 PYTHONPATH=DIR pytest
tests/test_ssm_state_passing_interpreted.py`` (about two minutes on two cores): CI runs it so, after the main
``pytest``, where it is skipped. On a GPU, ``tests/test_gpu_ssm_state_passing.py`` runs the same
checks with both kernels compiled."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from gloo_world import run_ranks
from saved_storages import SavedStorages
from state_passing_harness import INTERPRETED, body, inputs
from triton_interpreter import interpreted, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def test_the_scan_kernel_computes_the_reference_recurrence_and_its_gradients():
    from hybrid_megatron.model.ssm_state_passing import kernel_scan, process_dt
    from ssd_reference import causal_conv, ssd_scan

    be = INTERPRETED
    data = inputs(be, 2, packed=True)  # 48 tokens a row: a start on a kernel chunk's edge, one inside, 1-token docs
    x, B, C = (t.contiguous() for t in be.dims.split(causal_conv(data["xbc"], data["conv_w"], data["conv_b"],
                                                                 data["seq_idx"])))
    args = {"x": x, "dt": process_dt(data["dt"], data["dt_bias"]), "A": -torch.exp(data["A_log"]), "B": B, "C": C,
            "D": data["D"]}
    g = torch.Generator().manual_seed(3)
    w_final = torch.randn(x.shape[0], be.dims.heads, be.dims.head_dim, be.dims.state, generator=g)
    results = {}
    with interpreted():  # before mamba-ssm is imported: it is imported without its package __init__
        for name, scan in (("kernel", kernel_scan(be.scan_chunk)), ("reference", ssd_scan)):
            leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
            y, final = scan(*leaves.values(), data["seq_idx"])
            ((y * data["weights"]).sum() + (final * w_final).sum()).backward()
            results[name] = {"y": y.detach(), "final": final.detach(),
                             **{f"grad_{k}": v.grad for k, v in leaves.items()}}
    rel = {k: _relative(results["kernel"][k], v) for k, v in results["reference"].items()}
    print({k: f"{v:.1e}" for k, v in rel.items()})
    assert max(rel.values()) < 1e-5, rel


def _interpreted_body(rank: int, out, **kwargs) -> None:
    with interpreted():
        body(rank, out, be=INTERPRETED, **kwargs)


@pytest.mark.parametrize("zigzag, packed, documents", [(False, False, None), (True, True, None),
                                                       (True, True, [4, 3, 7, 5])],
                         ids=["contiguous", "zigzag-packed", "per-document"])
def test_two_cp_ranks_through_the_interpreted_kernel_compute_the_whole_sequence(zigzag, packed, documents):
    results = run_ranks(partial(_interpreted_body, zigzag=zigzag, packed=packed, documents=documents), world=2, cp=2)
    for rank, r in results.items():
        rel = {k: v / max(r["scale"][k], 1e-12) for k, v in r["diff"].items()}
        print(rank, {k: f"{v:.1e}" for k, v in rel.items()})
        bad = {k: v for k, v in rel.items() if v > 1e-5}
        assert not bad, f"CP rank {rank} differs from the whole sequence (relative to its largest value): {bad}"


class _ConvKeepingWhatCausalConv1dKeeps(torch.autograd.Function):
    """causal-conv1d's kernel is CUDA only. This depthwise conv keeps for its backward what causal-conv1d's autograd
    function keeps (``CausalConv1dFn``: its input, weight, bias and seq_idx), so that the count below covers our code,
    the scan kernel and the gated norm exactly; tests/test_gpu_ssm_state_passing.py counts the real conv."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx):  # x: [b, channels, length], channel-last in memory
        ctx.save_for_backward(x, weight, bias, seq_idx)
        return torch.nn.functional.silu(
            torch.nn.functional.conv1d(torch.nn.functional.pad(x, (weight.shape[1] - 1, 0)), weight[:, None], bias,
                                       groups=x.shape[1]))

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("counts only")


def _memory_body(rank: int, out, documents: list[int] | None) -> None:
    """What ssm_core (the state-passing mixer's core: conv, scan, state passing, gated RMSNorm) and the out_proj
    keep for the backward on this CP rank, in bf16 as training runs, against model/memory.py: two rows of one
    document in megatron's zigzag, or one packed row of ``documents`` split one document at a time."""
    from megatron.core import parallel_state as ps

    from gpu_helpers import tiny_config
    from hybrid_megatron.model import geometry as geo
    from hybrid_megatron.model.mamba_cp_mixer import ssm_core
    from hybrid_megatron.model.memory import mamba_mixer_stored
    from hybrid_megatron.model.ssm_state_passing import Dims, Layout, kernel_scan
    from triton_interpreter import load

    m = tiny_config("model.hidden_size=64", "model.mamba_head_dim=16", "model.mamba_num_groups=2",
                    "model.mamba_state_dim=16", "model.mamba_chunk_size=32", "model.num_attention_heads=4",
                    "model.num_query_groups=2").model
    dims = Dims(heads=m.num_mamba_heads, head_dim=m.mamba_head_dim, groups=m.mamba_num_groups,
                state=m.mamba_state_dim, conv_kernel=4)
    cp, bf16 = 2, torch.bfloat16
    if documents is None:  # two zigzag chunks of 48 tokens a row on each of the 2 CP ranks
        rows, local = 2, 96
        layout, seq_idx = Layout.rows(cp, True, local), torch.zeros(rows, local, dtype=torch.int32)
        sequences = rows  # the model's b: each sequence has 2 x CP chunks, 2 of them here
    else:  # the per-document split: the model's per-sequence terms hold per document
        rows, local = 1, sum(documents) // cp
        layout = Layout.documents(cp, documents)
        ids = layout.ids[rank]
        seq_idx = torch.repeat_interleave(torch.tensor([k // (2 * cp) for k in ids]),
                                          torch.tensor([layout.lengths[k] for k in ids])).to(torch.int32)[None]
        sequences = len(documents)
    chunks = [layout.lengths[k] for k in layout.ids[rank]]
    g = torch.Generator().manual_seed(0)
    with interpreted():
        norm = load("layernorm_gated").RMSNorm(m.mamba_d_inner, eps=1e-5, group_size=m.mamba_d_inner // dims.groups,
                                               norm_before_gate=False, dtype=bf16)
        zxBCdt = (torch.randn(local, rows, geo.mamba_widths(m).in_proj, generator=g) * 0.5).to(bf16).requires_grad_()
        conv_w = (torch.randn(dims.channels, dims.conv_kernel, generator=g) * 0.3).to(bf16).requires_grad_()
        conv_b = torch.zeros(dims.channels, dtype=bf16, requires_grad=True)
        dt_bias, A_log, D = (torch.zeros(dims.heads, requires_grad=True) for _ in range(3))  # fp32, as trained
        out_w = (torch.randn(m.hidden_size, m.mamba_d_inner, generator=g) * 0.05).to(bf16).requires_grad_()
        saved = SavedStorages([conv_w, conv_b, dt_bias, A_log, D, out_w, norm.weight])  # the parameters

        def conv(x, seq_idx):
            return _ConvKeepingWhatCausalConv1dKeeps.apply(x.transpose(1, 2), conv_w, conv_b,
                                                           seq_idx.to(torch.int32)).transpose(1, 2)

        def core(gated_norm):
            return ssm_core(zxBCdt, dims, dt_bias, A_log, D, layout, seq_idx, ps.get_context_parallel_group(),
                            conv=conv, scan=kernel_scan(m.mamba_chunk_size), norm=gated_norm)

        with saved.hooks():
            y = core(norm)
            torch.nn.functional.linear(y, out_w)
        # the gate inside the norm's kernel (fp32) is the norm of the gated output, up to bf16 rounding
        with torch.no_grad():
            unfused = norm(core(None))
        gate_diff = float((y.float() - unfused.float()).abs().max() / unfused.float().abs().max())
    # what the model leaves out: each chunk's conv halo (input and output, int32 ids), and the scan kernel's fp32
    # dA cumsum padded to whole kernel chunks
    halo = len(chunks) * rows * (dims.conv_kernel - 1) * (2 * 2 * dims.channels + 4)
    q = m.mamba_chunk_size
    padding = sum(-(-n // q) * q - n for n in chunks) * rows * dims.heads * 4
    out[rank] = {"measured": saved.bytes, "halo": halo, "padding": padding, "gate_diff": gate_diff,
                 "model": mamba_mixer_stored(m, rows * local, 1, 2 * cp, sequences)}


@pytest.mark.parametrize("documents", [None, [48, 96, 48]], ids=["rows", "packed-documents"])
def test_the_memory_model_counts_what_state_passing_keeps_for_its_backward(documents):
    for rank, r in run_ranks(partial(_memory_body, documents=documents), world=2, cp=2).items():
        print(rank, r)
        expected = r["model"] + r["halo"] + r["padding"]
        assert expected <= r["measured"] <= expected + 256, (rank, r)  # + A = -exp(A_log), tiny
        assert r["gate_diff"] < 2e-2, r
