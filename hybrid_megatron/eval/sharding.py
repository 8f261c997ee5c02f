"""How the item-based suites (mqar, state, niah, generation) split their items over data-parallel ranks
and collect the outcomes back: contiguous shares in rank order, so the result is the same at every layout."""

from __future__ import annotations


def dp_share(n: int) -> slice:
    """This data-parallel rank's contiguous share of ``n`` items (which every DP size must divide)."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if n % dp:
        raise ValueError(f"{n} items do not split over {dp} data-parallel ranks")
    local = n // dp
    return slice(rank * local, (rank + 1) * local)


def gather_over_dp(local: list) -> list:
    """Every rank's ``local`` list, concatenated in rank order (the same on every rank)."""
    import torch
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return local
    parts = [None] * dp
    torch.distributed.all_gather_object(parts, local, group=parallel_state.get_data_parallel_group())
    return [x for part in parts for x in part]
