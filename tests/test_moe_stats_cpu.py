"""Router statistics across data-parallel ranks on CPU gloo ranks: the load imbalance of the worst MoE layer over
every rank's tokens, the dropped fraction, and megatron's balancing loss per step averaged over layers and ranks.
(The hooks on megatron's real routers run on the GPU: tests/test_gpu_moe.py.)"""

from __future__ import annotations

import pytest
import torch

from gloo_world import run_ranks

MOE = ["model.hybrid_layer_pattern=MEME", "model.moe_num_experts=4", "model.moe_top_k=2"]


def _rank(rank: int, out: dict):
    """One of two data-parallel ranks."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.training.moe_stats import RouterStats

    cfg = load_run_config("configs/tiny.yaml", MOE)
    stats = RouterStats([], cfg)  # the counts the router hooks would add up, set by hand
    stats.counts = torch.tensor([[10.0, 10.0, 10.0, 10.0], [30.0, 10.0, 0.0, 0.0]]) * (rank + 1)
    stats.tokens = torch.tensor([20.0, 25.0]) * (rank + 1)  # layer 2 routed 40 of its 50 copies on rank 0
    tracker = get_moe_metrics_tracker()
    for layer, value in ((2, 1.0 + rank), (4, 3.0 + rank)):  # two micro-batches each
        for _ in range(2):
            tracker.record("load_balancing_loss", torch.tensor(value), layer, 4)
    stats.calls += 2
    stats.step_end()
    out[rank] = stats.summary()
    out[f"cleared{rank}"] = float(stats.counts.sum())


@pytest.fixture(scope="module")
def summaries():
    return run_ranks(_rank, world=2)


def test_the_worst_layer_over_all_ranks_and_the_dropped_share(summaries):
    # layer 2 over both ranks: 90, 30, 0, 0 routed copies, mean 30: the busiest expert has 3x its share
    assert summaries[0]["moe_load_imbalance"] == pytest.approx(3.0)
    # routed 120 + 120 copies of (60 + 75) tokens x top-2 = 270: the 30 dropped are all layer 2's
    assert summaries[0]["moe_dropped"] == pytest.approx(30 / 270)
    assert summaries[0] == summaries[1] and summaries["cleared0"] == summaries["cleared1"] == 0.0


def test_the_balancing_loss_is_a_mean_over_micro_batches_layers_and_ranks(summaries):
    # rank 0: layers (1, 3), rank 1: (2, 4); each summed over 2 micro-batches and divided by them
    assert summaries[0]["moe_aux_loss"] == pytest.approx((1 + 3 + 2 + 4) / 4)
