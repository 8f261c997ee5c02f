"""The ``ppl`` and ``length`` suites: forward only through megatron's pipeline schedule, at the process
layout (any TP/PP/DP), on the validation sources of the checkpoint's data config.

Both read their windows through ``data_pipeline.validation.ValidationSet``, so the windows are the same
for every DP size and packed as in training; sums are taken over every token of every rank before the
division, so the numbers do not depend on the layout. Every rank returns the same dict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from functools import partial

from data_pipeline.loader import TokenizerInfo
from hybrid_megatron.config import RunConfig
from hybrid_megatron.eval import positions
from hybrid_megatron.eval.suites import EvalOptions

log = logging.getLogger(__name__)


def model_max_length(cfg: RunConfig, opts: EvalOptions) -> int:
    """Positions the model must be built for (rotary tables) to run every selected suite."""
    longest = cfg.data.longest_seq_len
    if {"length", "niah"} & set(opts.suites):
        longest *= max(opts.lengths)
    if opts.seq_lens and {"mqar", "state"} & set(opts.suites):
        longest = max(longest, max(opts.seq_lens))
    if "generation" in opts.suites:
        longest = max(longest, opts.prompt_tokens + opts.max_new_tokens)
    return max(longest, cfg.data.validation.seq_len or 0) if cfg.data.validation else longest


def _validation_set(cfg: RunConfig, seq_len: int, tokens: int | None, tokenizer: TokenizerInfo | None):
    from megatron.core import parallel_state

    from data_pipeline.validation import ValidationSet

    data = cfg.data
    v = dataclasses.replace(data.validation, seq_len=seq_len, tokens=tokens or data.validation.tokens)
    return ValidationSet(dataclasses.replace(data, validation=v), parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size(), seq_len, tokenizer)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def announce(bar, tokens: int) -> None:
    """Adds ``tokens`` (what a suite is about to read) to the progress bar's total."""
    bar.total = (bar.total or 0) + tokens
    bar.refresh()


def _announce(data, bar):
    """Adds this rank's share of a validation set's tokens to the bar's total."""
    announce(bar, data.tokens_per_evaluation // data.dp_size)
    return data


def _counted(batches, bar):
    for batch in batches:
        yield batch
        bar.update(batch.input_ids.shape[0] * batch.seq_len)


def run_ppl(chunks, cfg: RunConfig, tokenizer: TokenizerInfo | None, bar) -> dict:
    """``bar``: a tqdm-like progress counter of this rank's tokens."""
    from hybrid_megatron.training.validate import loss_by_source, summarize

    start = time.perf_counter()
    data = _announce(_validation_set(cfg, cfg.data.validation.seq_len or cfg.data.longest_seq_len, None, tokenizer), bar)
    sums = loss_by_source(_counted(data.batches(), bar), chunks, cfg, cfg.data.longest_seq_len)
    record = summarize(sums)
    by_source = {name: {"loss": s / max(n, 1.0), "ppl": _ppl(s / max(n, 1.0)), "tokens": int(n)}
                 for name, (s, n) in sorted(sums.items())}
    log.info("ppl: loss %.4f (perplexity %.3f) over %d tokens", record["loss"], _ppl(record["loss"]),
             record["tokens"])
    return {"loss": record["loss"], "ppl": _ppl(record["loss"]), "tokens": record["tokens"],
            "seq_len": data.seq_len, "by_source": by_source, "seconds": round(time.perf_counter() - start, 2)}


def _position_loss(bin_size: int, bins: int, mb):
    return partial(_position_loss_func, mb.loss_mask, mb.position_ids, bin_size, bins)


def _position_loss_func(loss_mask, position_ids, bin_size: int, bins: int, output_tensor):
    import torch

    losses = output_tensor.float()
    table = positions.position_bins(losses, position_ids, loss_mask, bin_size, bins)
    mask = loss_mask.reshape(-1)
    return (losses.reshape(-1) * mask).sum(), mask.sum().to(torch.int), {"positions": table}


def run_length(chunks, cfg: RunConfig, opts: EvalOptions, tokenizer: TokenizerInfo | None, bar) -> dict:
    """Loss by position for windows of each multiple of the training length, all sources together."""
    import torch

    from hybrid_megatron.training.step import run_schedule, sum_over_ranks

    train_len = cfg.data.longest_seq_len
    bin_size = opts.bin_size or max(1, train_len // 8)
    out = {"train_len": train_len, "bin_size": bin_size, "by_length": {}}
    sets = [_announce(_validation_set(cfg, k * train_len, opts.length_tokens, tokenizer), bar) for k in opts.lengths]
    for k, data in zip(opts.lengths, sets):
        start = time.perf_counter()
        window = k * train_len
        bins = positions.num_bins(window, bin_size)
        table = torch.zeros(2, bins, dtype=torch.float64)
        with torch.no_grad():
            for batch in _counted(data.batches(), bar):
                reports = run_schedule(batch, chunks, cfg, train_len, forward_only=True,
                                       loss_of=partial(_position_loss, bin_size, bins))
                table += sum_over_ranks(reports, "positions", (2, bins)).cpu()
        rows = positions.curve(table.tolist(), bin_size)
        tokens = int(table[1].sum())
        loss = float(table[0].sum() / max(tokens, 1))
        out["by_length"][f"{k}x"] = {"window": window, "loss": loss, "ppl": _ppl(loss), "tokens": tokens,
                                     "beyond_train_len": positions.beyond(rows, train_len), "bins": rows,
                                     "seconds": round(time.perf_counter() - start, 2)}
        log.info("length %dx (%d tokens per window): loss %.4f over %d tokens, %.1f s", k, window, loss, tokens,
                 time.perf_counter() - start)
    return out
