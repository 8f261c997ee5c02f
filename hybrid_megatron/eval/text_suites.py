"""The ``niah`` and ``generation`` suites (items and prompts: ``needle.py``; decoding: ``decode.py``).

``niah``: pass-key retrieval at depths 0-100% of contexts of 1x-8x the training length (``--lengths``),
``--niah-items`` keys per cell; accuracy per cell and a heatmap.
``generation``: continuations of held-out prompts at temperatures 0, 0.7 and 1.0: distinct-1/distinct-2
over all continuations, the rep-4 repetition rate in the first 200 tokens, the mean length before EOS and
the share that reached EOS, with a few samples as text.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from hybrid_megatron.config import RunConfig
from hybrid_megatron.eval.megatron_suites import announce
from hybrid_megatron.eval.sharding import dp_share, gather_over_dp
from hybrid_megatron.eval.suites import EvalOptions

log = logging.getLogger(__name__)
TEMPERATURES = (0.0, 0.7, 1.0)
SAMPLES_SHOWN = 3


def depths(count: int) -> list[float]:
    return [i / (count - 1) for i in range(count)] if count > 1 else [0.5]


def run_niah(chunks, cfg: RunConfig, opts: EvalOptions, tokenizer, indexes: dict, vocab_size: int, bar) -> dict:
    from hybrid_megatron.eval.decode import generate
    from hybrid_megatron.eval.needle import filler, niah_item, pass_keys

    train_len = cfg.data.longest_seq_len
    hay = filler(indexes, cfg.data.seed, max(opts.lengths) * train_len, tokenizer.eos_id)
    out = {"train_len": train_len, "items_per_cell": opts.niah_items, "cells": []}
    for k in opts.lengths:
        for d, depth in enumerate(depths(opts.niah_depths)):
            start = time.perf_counter()
            keys = pass_keys((opts.seed or 0) * 1_000_003 + 1000 * k + d, opts.niah_items)  # fresh keys per cell
            items = [niah_item(tokenizer, hay, k * train_len, depth, key) for key in keys]
            mine = items[dp_share(len(items))]
            answer_len = max(a.size for _, a in items)
            announce(bar, sum(p.size for p, _ in mine) * answer_len)
            got = generate(chunks, cfg, [p for p, _ in mine], answer_len, 0.0, 0, tokenizer.eos_id, vocab_size,
                           stop_at_eos=False)
            right = gather_over_dp([g[:a.size] == a.tolist() for g, (_, a) in zip(got, mine)])
            bar.update(sum(p.size for p, _ in mine) * answer_len)
            out["cells"].append({"length": k * train_len, "multiple": k, "depth": depth,
                                 "accuracy": float(np.mean(right)), "items": len(right),
                                 "seconds": round(time.perf_counter() - start, 2)})
        log.info("niah %dx: accuracy %s", k, [c["accuracy"] for c in out["cells"] if c["multiple"] == k])
    return out


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all sequences (distinct-1, distinct-2 of Li et al., 2016)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequence: list[int], n: int = 4, first: int = 200) -> float:
    """Share of the n-grams within the first ``first`` tokens that repeat an earlier one (rep-n of Welleck et
    al., 2020: 1 - distinct / total)."""
    head = list(sequence[:first])
    grams = [tuple(head[i:i + n]) for i in range(len(head) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def generation_metrics(continuations: list[list[int]], eos_id: int, max_new: int) -> dict:
    """Metrics of one temperature's continuations (EOS and what follows it excluded)."""
    cut = [c[:c.index(eos_id)] if eos_id in c else c for c in continuations]
    return {"distinct_1": distinct_n(cut, 1), "distinct_2": distinct_n(cut, 2),
            "repetition_rate_4": float(np.mean([repetition_rate(c, 4, 200) for c in cut])),
            "mean_length": float(np.mean([len(c) for c in cut])),
            "reached_eos": float(np.mean([eos_id in c for c in continuations])), "max_new_tokens": max_new}


def run_generation(chunks, cfg: RunConfig, opts: EvalOptions, tokenizer, indexes: dict, vocab_size: int,
                   bar) -> dict:
    from hybrid_megatron.eval.decode import generate
    from hybrid_megatron.eval.needle import documents

    docs = documents(indexes, cfg.data.seed, tokenizer.eos_id, opts.prompt_tokens + 1, opts.prompts,
                     scan_tokens=max(1 << 22, 64 * opts.prompts * opts.prompt_tokens))
    prompts = [d[:opts.prompt_tokens] for d in docs]
    mine = prompts[dp_share(len(prompts))]
    out = {"prompts": len(prompts), "prompt_tokens": opts.prompt_tokens, "by_temperature": {}}
    announce(bar, len(TEMPERATURES) * len(mine) * opts.max_new_tokens)  # at most: rows stop at EOS
    for t in TEMPERATURES:
        got = gather_over_dp(generate(chunks, cfg, mine, opts.max_new_tokens, t, opts.seed or 0, tokenizer.eos_id,
                               vocab_size))
        bar.update(len(mine) * opts.max_new_tokens)
        row = generation_metrics(got, tokenizer.eos_id, opts.max_new_tokens)
        row["samples"] = [{"prompt": tokenizer.decode(prompts[i]), "continuation": tokenizer.decode(got[i])}
                          for i in range(min(SAMPLES_SHOWN, len(got)))]
        out["by_temperature"][str(t)] = row
        log.info("generation at temperature %s: distinct-2 %.3f, rep-4 %.3f, mean length %.1f", t,
                 row["distinct_2"], row["repetition_rate_4"], row["mean_length"])
    return out
