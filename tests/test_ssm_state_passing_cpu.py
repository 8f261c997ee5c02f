"""State-passing context parallelism for Mamba-2 (model/ssm_state_passing.py) on CPU gloo ranks: each rank runs
the token-by-token reference conv and scan over its chunks only, and after the halo, the state passing and the
correction its outputs and every gradient are the whole sequence's (float64, to rounding), for contiguous and
zigzag layouts, unpacked and packed rows, at CP 2 and 4 (twice the 2 heads per group: no head cap)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from hybrid_megatron.model.ssm_state_passing import chunk_ids, entering_states
from gloo_world import run_ranks
from state_passing_harness import REFERENCE, body


@pytest.mark.parametrize("cp, zigzag, packed", [(2, False, False), (2, True, True), (4, True, True), (4, False, True)],
                         ids=["cp2-contiguous", "cp2-zigzag-packed", "cp4-zigzag-packed", "cp4-contiguous-packed"])
def test_cp_ranks_compute_the_whole_sequence_forward_and_backward(cp, zigzag, packed):
    results = run_ranks(partial(body, be=REFERENCE, zigzag=zigzag, packed=packed), world=cp, cp=cp)
    assert sorted(results) == list(range(cp))
    for rank, r in results.items():
        assert r["scale"]["y"] > 0.1, r  # the outputs are not vanishing
        bad = {k: v for k, v in r["diff"].items() if v > 1e-10}
        assert not bad, f"CP rank {rank} differs from the whole sequence: {bad}"


@pytest.mark.parametrize("cp, documents", [(2, [3, 6, 3, 9]), (4, [3, 5, 3])], ids=["cp2", "cp4"])
def test_packed_documents_split_one_at_a_time_compute_the_whole_sequence(cp, documents):
    """megatron's per-document split (each document in 2 x CP chunks, rank r holding chunks r and 2 x CP - 1 - r of
    every one): documents of 3 to 9 tokens per chunk, the shortest exactly the conv's halo."""
    results = run_ranks(partial(body, be=REFERENCE, zigzag=True, packed=True, documents=documents), world=cp, cp=cp)
    assert sorted(results) == list(range(cp))
    for rank, r in results.items():
        assert r["scale"]["y"] > 0.1, r
        bad = {k: v for k, v in r["diff"].items() if v > 1e-10}
        assert not bad, f"CP rank {rank} differs from the whole sequence: {bad}"


def test_the_document_layout_is_megatrons_per_document_split():
    """Chunk ids run document by document; rank r holds chunks r and 2 x CP - 1 - r of each; lengths per chunk."""
    from hybrid_megatron.model.ssm_state_passing import Layout

    layout = Layout.documents(2, [8, 4])
    assert layout.ids == ((0, 3, 4, 7), (1, 2, 5, 6)) and layout.lengths == (2, 2, 2, 2, 1, 1, 1, 1)
    assert Layout.rows(2, True, 6) == Layout(((0, 3), (1, 2)), (3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"documents of \[6\] tokens do not split into 2 x CP = 4 chunks"):
        Layout.documents(2, [8, 6])


def _megatron_share(rank: int, out) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens = torch.arange(2 * 24).reshape(2, 24)
    share = get_batch_on_this_cp_rank({"tokens": tokens, "cu_seqlens": None}, is_hybrid_cp=False,
                                      cp_group=ps.get_context_parallel_group())["tokens"]
    ids = chunk_ids(ps.get_context_parallel_rank(), ps.get_context_parallel_world_size(), zigzag=True)
    chunk = 24 // (2 * ps.get_context_parallel_world_size())
    out[rank] = (share.tolist(), tokens[:, [t for k in ids for t in range(k * chunk, (k + 1) * chunk)]].tolist())


def test_the_zigzag_layout_is_megatrons_cp_data_split():
    """The tokens megatron's CP batch split gives a rank are the chunks ``chunk_ids`` says it holds, in order."""
    for rank, (megatron_share, ours) in run_ranks(_megatron_share, world=3, cp=3).items():
        assert megatron_share == ours, rank


def test_zigzag_chunks_balance_the_causal_work():
    assert [chunk_ids(r, 4, zigzag=True) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert chunk_ids(2, 4, zigzag=False) == (2,)
    with pytest.raises(ValueError, match="outside a CP group of 2"):
        chunk_ids(2, 2, zigzag=False)


def test_entering_states_chain_decays_and_final_states():
    finals = torch.arange(1.0, 4.0).reshape(3, 1, 1, 1)
    passes = torch.tensor([0.5, 0.0, 0.25]).reshape(3, 1, 1)
    states = entering_states(finals, passes)
    # H_0 = 0; H_1 = 0.5 * 0 + 1 = 1; H_2 = 0 * 1 + 2 = 2 (a document started inside chunk 1)
    assert states.flatten().tolist() == [0.0, 1.0, 2.0]


def test_this_ranks_entering_states_keep_only_the_gathered_summaries_and_match_autograd():
    """EnteringStates (the recursion's backward run in reverse over recomputed states) against plain autograd
    through entering_states, float64, for the chunks of one rank in a zigzag of 4 ranks; its forward keeps the
    gathered buffer alone, where autograd through the recursion keeps every chunk's state."""
    from hybrid_megatron.model.ssm_state_passing import EnteringStates, Layout

    torch.manual_seed(0)
    layout, b, h, s = Layout.rows(4, True, 6), 2, 3, 5
    gathered = torch.randn(4, 2, b, h * s + h, dtype=torch.float64)
    gathered[..., h * s:] = torch.rand(4, 2, b, h, dtype=torch.float64)  # decays in [0, 1)
    gathered[0, 1, 0, h * s:] = 0.0  # a document starts inside chunk 7's first row
    where = layout.slots
    for rank in range(4):
        wanted = layout.ids[rank]
        mine = gathered.clone().requires_grad_()
        torch.autograd.gradcheck(lambda g: EnteringStates.apply(g, where, wanted, h), (mine,))
        ordered = mine[[r for r, _ in where], [i for _, i in where]]
        reference = entering_states(ordered[..., :h * s].reshape(8, b, h, s), ordered[..., h * s:])[list(wanted)]
        assert torch.equal(EnteringStates.apply(mine, where, wanted, h), reference)
    saved = []
    leaf = gathered.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        EnteringStates.apply(leaf, where, layout.ids[0], h)
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr()


def test_the_entering_share_matches_the_expanded_product_and_saves_only_its_inputs():
    """The correction y += reach * C . H (heads in contiguous blocks per B/C group) and its gradients equal the
    plain autograd of C expanded to the heads; its forward keeps nothing for the backward beyond its inputs."""
    from hybrid_megatron.model.ssm_state_passing import EnteringShare

    torch.manual_seed(0)
    b, l, g, r, p, n = 2, 5, 2, 3, 4, 6
    C = torch.randn(b, l, g, n, dtype=torch.float64, requires_grad=True)
    H = torch.randn(b, g * r, p, n, dtype=torch.float64, requires_grad=True)
    reach = torch.rand(b, l, g * r, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(EnteringShare.apply, (C, H, reach))

    expanded = torch.einsum("blhn,bhpn->blhp", C.repeat_interleave(r, dim=2), H) * reach[..., None]
    w = torch.randn_like(expanded)
    want = torch.autograd.grad((expanded * w).sum(), (C, H, reach))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = EnteringShare.apply(C, H, reach)
    torch.testing.assert_close(out, expanded, rtol=0, atol=1e-12)
    for got, ref in zip(torch.autograd.grad((out * w).sum(), (C, H, reach)), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert sorted(t.numel() for t in saved) == sorted([C.numel(), H.numel(), reach.numel()])
