"""State passing with mamba-ssm's real SSD kernel, without a GPU: the kernel runs in Triton's interpreter on the CPU
(``tests/triton_interpreter.py``), the conv is the reference (causal-conv1d is CUDA only). What the state passing
relies on in the kernel (a document's state stops at ``seq_idx`` boundaries, the final state is the last
document's from zero, the gradient flows back through that final state, the D skip) is checked against the token-by-token
reference, then two CP ranks against the whole sequence through the same kernel, forward and backward.

Opt-in: ``TRITON_INTERPRET=1 PYTHONPATH=<mamba-ssm source> pytest tests/test_ssm_state_passing_interpreted.py``
(about a minute); skipped otherwise, as in CI. On a GPU, ``tests/test_gpu_ssm_state_passing.py`` runs the same
checks with both kernels compiled."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from gloo_world import run_ranks
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
    for name, scan in (("kernel", kernel_scan(be.scan_chunk)), ("reference", ssd_scan)):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
        with interpreted():
            y, final = scan(*leaves.values(), data["seq_idx"])
            ((y * data["weights"]).sum() + (final * w_final).sum()).backward()
        results[name] = {"y": y.detach(), "final": final.detach(), **{f"grad_{k}": v.grad for k, v in leaves.items()}}
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
