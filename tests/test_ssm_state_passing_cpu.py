"""State-passing context parallelism for Mamba-2 (model/ssm_state_passing.py) on CPU gloo ranks: each rank runs
the reference conv and scan over its chunks only, and after the halo, the state passing and the correction its
outputs and the gradients are the whole sequence's, for contiguous and zigzag layouts, unpacked and packed rows,
at CP 2 and 4 (twice the 2 heads per group: no head cap)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from hybrid_megatron.model.ssm_state_passing import Dims, chunk_ids, entering_states, mamba_state_passing, process_dt
from tests.gloo_world import run_ranks
from tests.ssd_reference import causal_conv, ssd_scan

DIMS = Dims(heads=4, head_dim=3, groups=2, state=5, conv_kernel=4)
CHUNK = 6  # tokens per chunk: longer than the halo (3), short enough for the token-by-token reference


def _doc_ids(length: int, starts: list[int]) -> torch.Tensor:
    ids = torch.zeros(length, dtype=torch.long)
    for s in starts:
        ids[s:] += 1
    return ids


def _inputs(n_chunks: int, packed: bool) -> dict:
    """The same global tensors on every rank (float64: the comparison is to rounding)."""
    g = torch.Generator().manual_seed(0)
    L, b, d = n_chunks * CHUNK, 2, torch.float64

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=d) * scale

    if packed:  # a start on a chunk's first token, one inside the next chunk's halo, a one-token document, a
        # document over more than a whole chunk (its state passes through one untouched)
        rows = [[CHUNK, CHUNK + 2, 2 * CHUNK + 1, 2 * CHUNK + 2], [1, L - CHUNK - 1]]
        seq_idx = torch.stack([_doc_ids(L, [s for s in r if s < L]) for r in rows])
    else:
        seq_idx = torch.zeros(b, L, dtype=torch.long)
    return {"xbc": randn(b, L, DIMS.channels), "dt": randn(b, L, DIMS.heads), "seq_idx": seq_idx,
            "weights": randn(b, L, DIMS.heads, DIMS.head_dim),
            "conv_w": randn(DIMS.channels, DIMS.conv_kernel, scale=0.5), "conv_b": randn(DIMS.channels, scale=0.1),
            "dt_bias": randn(DIMS.heads, scale=0.5), "A_log": randn(DIMS.heads, scale=0.5), "D": randn(DIMS.heads)}


PARAMS = ("conv_w", "conv_b", "dt_bias", "A_log", "D")


def _core(xbc, dt_raw, seq_idx, p, run):
    A = -torch.exp(p["A_log"])
    conv = partial(_conv, p["conv_w"], p["conv_b"])
    return run(xbc, process_dt(dt_raw, p["dt_bias"]), seq_idx, A, p["D"], conv)


def _conv(weight, bias, x, seq_idx):
    return causal_conv(x, weight, bias, seq_idx)


def _whole(xbc, dt, seq_idx, A, D, conv):
    """The whole sequence on one rank: the reference."""
    u = conv(xbc, seq_idx)
    x, B, C = torch.split(u, [DIMS.heads * DIMS.head_dim, DIMS.groups * DIMS.state, DIMS.groups * DIMS.state], -1)
    x = x.unflatten(-1, (DIMS.heads, DIMS.head_dim))
    y, _ = ssd_scan(x, dt, A, B.unflatten(-1, (DIMS.groups, DIMS.state)), C.unflatten(-1, (DIMS.groups, DIMS.state)),
                    seq_idx)
    return y + x * D[:, None]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _body(rank: int, out, zigzag: bool, packed: bool) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, cp, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    ids = chunk_ids(cp_rank, cp, zigzag)
    data = _inputs(2 * cp if zigzag else cp, packed)
    ref_p = {k: data[k].clone().requires_grad_() for k in PARAMS}
    ref_in = {k: data[k].clone().requires_grad_() for k in ("xbc", "dt")}
    y_ref = _core(ref_in["xbc"], ref_in["dt"], data["seq_idx"], ref_p, _whole)
    (y_ref * data["weights"]).sum().backward()

    index = torch.cat([torch.arange(k * CHUNK, (k + 1) * CHUNK) for k in ids])
    p = {k: data[k].clone().requires_grad_() for k in PARAMS}
    local = {k: data[k][:, index].clone().requires_grad_() for k in ("xbc", "dt")}
    run = partial(_run_cp, zigzag=zigzag, group=group)
    y = _core(local["xbc"], local["dt"], data["seq_idx"][:, index], p, run)
    (y * data["weights"][:, index]).sum().backward()
    for k in PARAMS:  # megatron sums parameter gradients over the CP ranks (the DP x CP reduction)
        dist.all_reduce(p[k].grad, group=group)
    out[rank] = {"y": _max_diff(y, y_ref[:, index]), "y_scale": float(y_ref.abs().max()),
                 **{f"grad_{k}": _max_diff(local[k].grad, ref_in[k].grad[:, index]) for k in local},
                 **{f"grad_{k}": _max_diff(p[k].grad, ref_p[k].grad) for k in PARAMS}}


def _run_cp(xbc, dt, seq_idx, A, D, conv, *, zigzag, group):
    return mamba_state_passing(xbc, dt, seq_idx, A, D, DIMS, zigzag, group, conv=conv, scan=ssd_scan)


@pytest.mark.parametrize("cp, zigzag, packed", [(2, False, False), (2, True, True), (4, True, True), (4, False, True)],
                         ids=["cp2-contiguous", "cp2-zigzag-packed", "cp4-zigzag-packed", "cp4-contiguous-packed"])
def test_cp_ranks_compute_the_whole_sequence_forward_and_backward(cp, zigzag, packed):
    results = run_ranks(partial(_body, zigzag=zigzag, packed=packed), world=cp, cp=cp)
    assert sorted(results) == list(range(cp))
    for rank, r in results.items():
        assert r["y_scale"] > 0.1, r  # the outputs are not vanishing
        bad = {k: v for k, v in r.items() if k != "y_scale" and v > 1e-10}
        assert not bad, f"CP rank {rank} differs from the whole sequence: {bad}"


def test_zigzag_chunks_balance_the_causal_work():
    assert [chunk_ids(r, 4, zigzag=True) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert chunk_ids(2, 4, zigzag=False) == (2,)
    with pytest.raises(ValueError, match="outside a CP group of 2"):
        chunk_ids(2, 2, zigzag=False)


def test_entering_states_chain_decays_and_final_states():
    finals = {k: torch.full((1, 1, 1, 1), float(k + 1)) for k in range(3)}
    passes = {0: torch.tensor([[0.5]]), 1: torch.tensor([[0.0]]), 2: torch.tensor([[0.25]])}
    states = entering_states(finals, passes)
    # H_0 = 0; H_1 = 0.5 * 0 + 1 = 1; H_2 = 0 * 1 + 2 = 2 (a document started inside chunk 1)
    assert [float(states[k]) for k in range(3)] == [0.0, 1.0, 2.0]
