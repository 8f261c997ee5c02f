"""One optimizer step on megatron-core: a StepBatch -> micro-batches -> forward/backward -> update.

Micro-batches hold a constant number of tokens (``train.micro_batch_size`` sequences at the longest
curriculum length), so a shorter curriculum length gets more sequences per micro-batch. With the
packing switch on, each micro-batch is flattened into megatron's ``thd`` layout ([1, mbs * L]) with
``cu_seqlens`` at every document start (attention) and ``seq_idx`` (Mamba-2 state reset).
The loss is a sum over tokens with ``calculate_per_token_loss``: megatron divides the gradients by the
global token count, so every token weighs the same whatever the micro-batch split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from data_pipeline.errors import ConfigError
from data_pipeline.loader import StepBatch
from data_pipeline.packing import cu_seqlens


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    packed_seq_params: object | None
    layer_params: dict | None = None  # per layer type ("mamba", "gdn", "attention"): other boundaries (model/segments.py)


def micro_batch_size_for(n_local: int, seq_len: int, micro_batch_size: int, max_seq_len: int,
                         microbatches_multiple_of: int = 1) -> int:
    """Largest divisor of ``n_local`` not above the token-constant target (at least 1) that leaves a
    number of micro-batches divisible by ``microbatches_multiple_of`` (the interleaved pipeline
    schedule runs micro-batches in groups of PP)."""
    target = max(1, micro_batch_size * max_seq_len // seq_len)
    for mbs in range(min(target, n_local), 0, -1):
        if n_local % mbs == 0 and (n_local // mbs) % microbatches_multiple_of == 0:
            return mbs
    raise ConfigError(
        f"{n_local} sequences of {seq_len} tokens per data-parallel rank cannot form a number of micro-batches "
        f"divisible by {microbatches_multiple_of} (the interleaved pipeline schedule needs a multiple of "
        f"parallel.pipeline_model_parallel_size): change data.global_batch_tokens or data.batch_size_multiple"
    )


def micro_batch_plan(cfg, schedule, dp_size: int) -> dict[int, tuple[int, int]]:
    """seq_len -> (sequences per micro-batch, micro-batches per step) on each DP rank, for every sequence
    length the run trains at; raises ConfigError before any GPU work when a step cannot be split
    (the interleaved pipeline schedule needs a multiple of PP micro-batches)."""
    from hybrid_megatron.model import pattern as pat

    pp = cfg.parallel.pipeline_model_parallel_size
    interleaved = pat.virtual_pipeline_size(cfg.model.hybrid_layer_pattern, pp) is not None
    max_seq = schedule.max_seq_len
    plan = {}
    for seq_len, n_global in sorted(schedule.shapes()):
        n_local = n_global // dp_size
        mbs = micro_batch_size_for(n_local, seq_len, cfg.train.micro_batch_size, max_seq, pp if interleaved else 1)
        plan[seq_len] = (mbs, n_local // mbs)
    return plan


def packed_params(seq_idx_NL: np.ndarray, device):
    """megatron's thd PackedSeqParams for rows flattened into one: documents where ``seq_idx`` changes."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens(seq_idx_NL)
    lengths = np.diff(cu)
    cu_t = torch.from_numpy(cu).to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=int(lengths.max()),
                           max_seqlen_kv=int(lengths.max()), total_tokens=int(cu[-1]))


def split_micro_batches(batch: StepBatch, mbs: int, packed: bool, device) -> list[MicroBatch]:
    out = []
    n = batch.input_ids.shape[0]
    for start in range(0, n, mbs):
        sl = slice(start, start + mbs)

        def t(a: np.ndarray, dtype=torch.long) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(a[sl])).to(dtype)
            return (x.reshape(1, -1) if packed else x).to(device, non_blocking=True)

        out.append(
            MicroBatch(
                input_ids=t(batch.input_ids),
                labels=t(batch.labels),
                loss_mask=t(batch.loss_mask, torch.float32),
                position_ids=t(batch.position_ids),
                packed_seq_params=packed_params(batch.seq_idx[sl], device) if packed else None,
            )
        )
    return out


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, loss_of=None, logits: bool = False):
    """One micro-batch through the model; ``loss_of(mb)`` makes the loss function (default: the training
    loss, a token sum). ``logits``: the last stage outputs logits ([b, s, vocab / TP]) instead of per-token
    losses. A micro-batch's ``layer_params`` apply for this call only."""
    from hybrid_megatron.model.segments import layer_overrides

    mb: MicroBatch = next(data_iterator)
    with layer_overrides(model, mb.layer_params):
        output = model(
            mb.input_ids,
            mb.position_ids,
            attention_mask=None,
            labels=None if logits else mb.labels,
            packed_seq_params=mb.packed_seq_params,
        )
    return output, (loss_of or _training_loss)(mb)


def _training_loss(mb: MicroBatch):
    return partial(loss_func, mb.loss_mask)


@dataclass
class StepResult:
    loss: float  # mean per token over the global batch
    tokens: int  # loss tokens in the global batch
    grad_norm: float | None
    skipped: bool


def plan_micro_batches(batch: StepBatch, model_chunks, cfg, max_seq_len: int) -> tuple[int, list[MicroBatch]]:
    """(sequences per micro-batch, this rank's micro-batches of ``batch``): ``train.micro_batch_size``
    sequences of ``max_seq_len`` tokens' worth each."""
    n_local, seq_len = batch.input_ids.shape
    interleaved = len(model_chunks) > 1
    mbs = micro_batch_size_for(n_local, seq_len, cfg.train.micro_batch_size, max_seq_len,
                               cfg.parallel.pipeline_model_parallel_size if interleaved else 1)
    micro = split_micro_batches(batch, mbs, cfg.data.reset_at_document_boundaries, torch.cuda.current_device())
    if cfg.parallel.context_parallel_size > 1:
        from megatron.core import parallel_state

        micro = [cp_share(mb, parallel_state.get_context_parallel_group()) for mb in micro]
    return mbs, micro


def cp_share(mb: MicroBatch, cp_group) -> MicroBatch:
    """This CP rank's share of every sequence of a micro-batch, by megatron's own split: the sequence in 2 x CP
    chunks, rank r holding chunks r and 2 x CP - 1 - r (load balance for causal attention; the layout
    model/ssm_state_passing.py assumes). Packed documents (padded to a multiple of 2 x CP: data.document_multiple)
    are split the same way one document at a time (megatron's per-document split, Transformer Engine's
    ``thd_get_partitioned_indices``); the PackedSeqParams stay the whole micro-batch's, as megatron's attention,
    Mamba and Gated DeltaNet context parallelism expect."""
    from dataclasses import replace

    from megatron.core.utils import get_batch_on_this_cp_rank

    keys = {"input_ids": "tokens", "labels": "labels", "loss_mask": "loss_mask", "position_ids": "position_ids"}
    batch = {theirs: getattr(mb, ours) for ours, theirs in keys.items()}
    params = mb.packed_seq_params
    if params is None:
        batch.update(cu_seqlens=None)
    else:  # a padded document's pads are its own tokens: its padded length is its length (CP reads the padded)
        cu = params.cu_seqlens_q
        params = replace(params, cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu)
        batch.update(cu_seqlens=cu[None], cu_seqlens_padded=cu[None])
    share = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return replace(mb, packed_seq_params=params, **{ours: share[theirs] for ours, theirs in keys.items()})


def schedule(micro: list[MicroBatch], mbs: int, seq_len: int, model_chunks, cfg, forward_only: bool = False,
             loss_of=None, logits: bool = False) -> list[dict]:
    """Micro-batches through megatron's pipeline schedule; returns the loss functions' reports (one per
    micro-batch, on the last pipeline stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    packed = cfg.data.reset_at_document_boundaries
    iterators = [iter(micro) for _ in model_chunks] if len(model_chunks) > 1 else iter(micro)
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss_of=loss_of, logits=logits),
        data_iterator=iterators,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro),
        seq_length=mbs * seq_len if packed else seq_len,
        micro_batch_size=1 if packed else mbs,
        forward_only=forward_only,
    )


def run_schedule(batch: StepBatch, model_chunks, cfg, max_seq_len: int, forward_only: bool = False,
                 loss_of=None) -> list[dict]:
    """``batch`` planned into micro-batches and run through the schedule (see ``schedule``)."""
    mbs, micro = plan_micro_batches(batch, model_chunks, cfg, max_seq_len)
    return schedule(micro, mbs, batch.input_ids.shape[1], model_chunks, cfg, forward_only, loss_of)


def sum_over_ranks(reports: list[dict], key: str, shape) -> torch.Tensor:
    """The sum of ``report[key]`` over micro-batches and data-parallel x context-parallel ranks (fp64), shared along the
    pipeline so that every rank holds it (the reports live on the last stage)."""
    from megatron.core import parallel_state

    total = torch.zeros(shape, device="cuda", dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in reports:
            total += item[key].double()
        # over DP x CP: with context parallelism each CP rank holds a share of every sequence's tokens
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def from_last_stage(reports: list[dict], key: str, shape, dtype=torch.float64) -> torch.Tensor:
    """``report[key]`` of the micro-batches, concatenated on the last pipeline stage and shared along the
    pipeline (this data-parallel rank's own values: nothing is summed over DP)."""
    from megatron.core import parallel_state

    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        out = torch.cat([r[key].to(dtype) for r in reports]).reshape(shape)
    else:
        out = torch.zeros(shape, device="cuda", dtype=dtype)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(out, group=parallel_state.get_pipeline_model_parallel_group())
    return out


def forward_backward(batch: StepBatch, model_chunks, cfg, max_seq_len: int, forward_only: bool = False
                     ) -> tuple[float, float]:
    """This rank's micro-batches through megatron's pipeline schedule; returns (loss sum, loss tokens) over
    the whole global batch, the same on every rank (so every rank takes the same skip/stop decision).
    With ``forward_only`` no gradient is computed."""
    reports = run_schedule(batch, model_chunks, cfg, max_seq_len, forward_only)
    loss_sum, tokens = sum_over_ranks(reports, "lm loss", 2).tolist()
    return loss_sum, tokens


def train_step(batch: StepBatch, model_chunks, optimizer, scheduler, cfg, max_seq_len: int) -> StepResult:
    """Forward/backward over this rank's micro-batches, the finite check, then the optimizer step."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss_sum, tokens = forward_backward(batch, model_chunks, cfg, max_seq_len)
    loss = loss_sum / max(tokens, 1.0)

    grad_norm, skipped = optimizer_step(optimizer, loss)
    # The schedule follows the data position (anneal segments start at a data step), so it advances
    # on skipped steps too.
    scheduler.step()
    return StepResult(loss, int(tokens), grad_norm, skipped)


def optimizer_step(optimizer, loss: float) -> tuple[float, bool]:
    """megatron's ``optimizer.step()`` in its parts, the gradient norm computed once: the norm decides
    the skip (a non-finite loss or norm leaves the weights and the optimizer state alone) and the clip.

    The same operations in the same order as megatron-core 0.19's ``MixedPrecisionOptimizer.step``,
    ``ChainedOptimizer.step`` and ``FP32Optimizer.step``: model grads -> fp32 main grads, the global
    norm, every sub-optimizer's main grads clipped by that one norm, the inner step and the param copy
    (or all-gather). Asking for the norm and then calling ``step()`` prepared the grads and took the
    norm twice. Not covered, and never configured here: separate grad-norm groups (multi-token prediction)
    and the precision-aware optimizer (decoupled grads). Returns (grad norm, skipped)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad()
        return grad_norm, True
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0.0:
            continue  # as megatron: a stub (no params on this rank) is not asked for its parameters
        params = sub.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=sub.config.clip_grad, total_norm=grad_norm)
    return grad_norm, not optimizer.step_with_ready_grads()
