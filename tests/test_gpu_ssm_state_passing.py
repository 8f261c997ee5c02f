"""GPU: state-passing context parallelism for Mamba-2 with the real kernels (causal-conv1d, mamba-ssm's chunked
SSD scan). First the kernel callables against the token-by-token reference (their seq_idx and final-state
semantics are what the state passing relies on), then two CP ranks sharing the one GPU over gloo against the
whole sequence through the same kernels, forward and backward."""

from __future__ import annotations

from functools import partial

import pytest

from gloo_world import run_ranks
from state_passing_harness import KERNELS, body, inputs

pytestmark = pytest.mark.gpu


def test_the_kernel_callables_compute_the_reference_recurrence():
    import torch

    from hybrid_megatron.model.ssm_state_passing import kernel_conv, kernel_scan, process_dt
    from ssd_reference import causal_conv, ssd_scan

    d = KERNELS.dims
    data = inputs(KERNELS, 2, packed=True)  # 128 tokens, four document starts in row 0, two in row 1
    seq_idx = data["seq_idx"]
    u = kernel_conv(data["conv_w"], data["conv_b"])(data["xbc"], seq_idx)
    u_ref = causal_conv(data["xbc"], data["conv_w"], data["conv_b"], seq_idx)
    assert float((u - u_ref).abs().max()) < 1e-5 * float(u_ref.abs().max())
    x, B, C = torch.split(u_ref, [d.heads * d.head_dim, d.groups * d.state, d.groups * d.state], -1)
    args = (x.unflatten(-1, (d.heads, d.head_dim)).contiguous(), process_dt(data["dt"], data["dt_bias"]),
            -torch.exp(data["A_log"]), B.unflatten(-1, (d.groups, d.state)).contiguous(),
            C.unflatten(-1, (d.groups, d.state)).contiguous(), seq_idx)
    (y, final), (y_ref, final_ref) = kernel_scan(KERNELS.scan_chunk)(*args), ssd_scan(*args)
    for got, want in ((y, y_ref), (final, final_ref)):  # the final state is the last document's, from zero
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("zigzag, packed", [(False, False), (True, True)], ids=["contiguous", "zigzag-packed"])
def test_two_cp_ranks_on_one_gpu_compute_the_whole_sequence(zigzag, packed):
    results = run_ranks(partial(body, be=KERNELS, zigzag=zigzag, packed=packed), world=2, cp=2)
    for rank, r in results.items():
        rel = {k: v / max(r["scale"][k], 1e-12) for k, v in r["diff"].items()}
        print(rank, {k: f"{v:.1e}" for k, v in rel.items()})
        bad = {k: v for k, v in rel.items() if v > 1e-4}
        assert not bad, f"CP rank {rank} differs from the whole sequence (relative to its largest value): {bad}"
