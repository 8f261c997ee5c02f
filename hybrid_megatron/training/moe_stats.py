"""Router statistics of the MoE layers for the training log: load balance, dropped tokens, the balancing loss.

megatron records its load-balancing loss per layer in its MoE metrics tracker during the forward. Token counts
per expert it does not keep (only with an expert bias, and it zeroes them inside the optimizer step), so a
forward hook on every router adds up the router's routing map (tokens x experts, True where a routed copy of a
token goes, after any capacity drop) over the log window. At each log interval, on every rank (collectives):

  moe_load_imbalance  the busiest expert's tokens / the mean tokens per expert, the worst MoE layer (1: even)
  moe_dropped         the fraction of the k routed copies of each token that a capacity factor dropped (0 when
                      dropless, megatron's default here)
  moe_aux_loss        megatron's load-balancing loss before its coefficient, mean over MoE layers and steps
"""

from __future__ import annotations

from hybrid_megatron.model import pattern as pat


def moe_routers(model_chunks) -> list:
    """The router module of every MoE layer of this rank, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class RouterStats:
    """Accumulates routing counts through forward hooks; ``step_end`` every step, ``summary`` at log time."""

    def __init__(self, model_chunks, cfg):
        import torch

        m = cfg.model
        self.sequence_parallel = cfg.parallel.sequence_parallel
        self.k, self.experts = m.moe_top_k, m.moe_num_experts
        self.flags = [int(s == pat.MOE) for s in pat.layers(m.hybrid_layer_pattern)]
        self.routers = moe_routers(model_chunks)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        self.counts = torch.zeros(max(len(self.routers), 1), self.experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(max(len(self.routers), 1), dtype=torch.float64, device=device)
        self.aux, self.steps = 0.0, 0
        self.calls = torch.zeros(1, device=device)  # router forwards of the step: micro-batches (and recomputes)
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def hook(module, _args, output):
            if module.training:
                routing_map = output[1]
                self.counts[i] += routing_map.sum(dim=0, dtype=self.counts.dtype)
                self.tokens[i] += routing_map.shape[0]
                if i == 0:
                    self.calls += 1
        return hook

    def step_end(self) -> None:
        """Reads (and clears) megatron's per-layer balancing loss of the step; collective over PP and DP.

        megatron sums it over the router's forwards (micro-batches, and recomputed forwards with full
        recompute): divided by the same count, which stages without MoE layers take from the others."""
        import torch
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        torch.distributed.all_reduce(self.calls, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_pipeline_model_parallel_group())
        calls = max(float(self.calls), 1.0)
        self.calls.zero_()
        totals: dict = {}
        get_moe_metrics_tracker().report(
            loss_scale=1.0 / calls, iteration=0, force_initialize=True,
            track_names=["load_balancing_loss"], num_layers=len(self.flags), moe_layer_freq=self.flags,
            total_loss_dict=totals)
        if "load_balancing_loss" in totals:
            self.aux += float(totals["load_balancing_loss"])
        self.steps += 1

    def summary(self) -> dict:
        """The window's statistics (same on every rank), then a fresh window."""
        import torch
        from megatron.core import parallel_state

        counts, expected = self.counts.clone(), self.tokens.clone() * self.k
        groups = [parallel_state.get_data_parallel_group(with_context_parallel=True)]  # CP ranks: other tokens
        if self.sequence_parallel:  # each TP rank routes its own part of the sequence
            groups.append(parallel_state.get_tensor_model_parallel_group())
        for group in groups:
            torch.distributed.all_reduce(counts, group=group)
            torch.distributed.all_reduce(expected, group=group)
        routed = counts.sum(dim=1)
        mean = (routed / self.experts).clamp(min=1.0)
        worst = torch.stack([(counts.max(dim=1).values / mean).max(), (expected - routed).sum(), expected.sum()])
        # the pipeline stages hold different layers: the worst layer and the totals over all of them
        imbalance = worst[:1].clone()
        torch.distributed.all_reduce(imbalance, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_pipeline_model_parallel_group())
        dropped = worst[1:].clone()
        torch.distributed.all_reduce(dropped, group=parallel_state.get_pipeline_model_parallel_group())
        out = {"moe_load_imbalance": float(imbalance), "moe_dropped": float(dropped[0] / dropped[1].clamp(min=1.0)),
               "moe_aux_loss": self.aux / max(self.steps, 1)}
        self.counts.zero_()
        self.tokens.zero_()
        self.aux, self.steps = 0.0, 0
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
