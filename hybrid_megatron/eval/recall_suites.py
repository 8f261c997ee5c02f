"""The ``mqar`` and ``state`` suites (see ``recall.py`` for how items are answered).

``mqar``: accuracy over answers for every (key-value pairs, sequence length) cell.
``state``: the same items under three conditions: the full model; the SSM state cut before the queries (the
Mamba and Gated DeltaNet layers start a new document at the first query, attention still sees the
bindings); attention cut to a window of ``attention_window`` tokens before the first query (the SSM intact). Per cut: accuracy, the
memory-reliance score (acc_full - acc_cut) / acc_full and McNemar's test on the paired answers, over items
(``mcnemar_items``: an item's answers share its sequence, so they are not independent) and, for reference, over
answers (``mcnemar``). A cut of a layer type the model does not have is reported as not applicable.

Every cell keeps its outcomes per item (``paired.pack_outcomes``) and the fingerprint of its items, so ``compare``
can test two runs on the same items against each other.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from data_pipeline.errors import ConfigError
from data_pipeline.synthetic import TASK, MqarOptions
from hybrid_megatron.config import RunConfig
from hybrid_megatron.eval import paired
from hybrid_megatron.eval.megatron_suites import announce
from hybrid_megatron.eval.suites import EvalOptions
from hybrid_megatron.model import pattern as pat

log = logging.getLogger(__name__)
SEED_OFFSET = 7919  # items default to the training source's seed plus this (never a seed the run read)


def training_mqar(cfg: RunConfig) -> tuple[MqarOptions, set[int]]:
    """The MQAR options of the run's training source, and every seed its MQAR sources (training and
    validation) were written with."""
    from data_pipeline.loader import open_sources, open_validation_sources

    indexes = dict(open_sources(cfg.data))
    if cfg.data.validation is not None:
        indexes.update(open_validation_sources(cfg.data))
    synthetic = {name: ix.stats["synthetic"] for name, ix in indexes.items()
                 if ix.stats.get("synthetic", {}).get("task") == TASK}
    trained = [s for name, s in synthetic.items() if name in cfg.data.sources]
    if not trained:
        raise ConfigError("--suite mqar/state needs a model trained on an MQAR source (prepare-data --synthetic "
                          f"mqar); the data config's sources are {sorted(cfg.data.sources)}")
    s = trained[0]
    return (MqarOptions(num_kv_pairs=tuple(s["num_kv_pairs"]), seq_len=s["seq_len"], vocab=s["vocab"], docs=1,
                        seed=s["seed"]), {int(x["seed"]) for x in synthetic.values()})


def grid(cfg: RunConfig, opts: EvalOptions) -> tuple[MqarOptions, list[tuple[int, int]], int]:
    """(training options, cells (pairs, seq_len), item seed) after every check that needs no GPU."""
    base, used = training_mqar(cfg)
    seed = opts.seed if opts.seed is not None else base.seed + SEED_OFFSET
    if seed in used:
        raise ConfigError(f"--seed {seed}: the run's MQAR sources were written with it; evaluate on unseen items")
    cells = [(p, L) for L in (opts.seq_lens or [base.seq_len]) for p in (opts.kv_pairs or list(base.num_kv_pairs))]
    for p, L in cells:
        MqarOptions(num_kv_pairs=(p,), seq_len=L, vocab=base.vocab, docs=opts.items, seed=seed).check()
        if "state" in opts.suites and opts.attention_window > L - 1 - 4 * p:
            raise ConfigError(f"--attention-window {opts.attention_window}: the PAD run between bindings and queries "
                              f"is {L - 1 - 4 * p} tokens at {p} pairs and length {L}; a wider window sees the bindings")
    if not cfg.data.reset_at_document_boundaries:
        raise ConfigError("--suite mqar/state: items are documents; the run config must have "
                          "data.reset_at_document_boundaries=true")
    return base, cells, seed


def run_mqar(chunks, cfg: RunConfig, opts: EvalOptions, vocab_size: int, bar) -> tuple[dict, dict]:
    """(the suite's results, every cell's answers right or not by (pairs, length): the ``state`` suite's full
    condition, the same items through the same model)."""
    from hybrid_megatron.eval.recall import answers_right, mqar_cell

    base, cells, seed = grid(cfg, opts)
    announce(bar, sum(opts.items * length for _, length in cells))
    out, outcomes = {"seed": seed, "items_per_cell": opts.items, "cells": []}, {}
    for pairs, seq_len in cells:
        start = time.perf_counter()
        cell = mqar_cell(base, pairs, seq_len, opts.items, seed)
        right = answers_right(chunks, cfg, cell, vocab_size, base.pad_id, base.eos_id, cfg.data.longest_seq_len)
        bar.update(cell.tokens.size)
        outcomes[pairs, seq_len] = right
        out["cells"].append(cell_accuracy(pairs, seq_len, right, time.perf_counter() - start, cell.fingerprint))
        log.info("mqar %d pairs, length %d: accuracy %.4f", pairs, seq_len, out["cells"][-1]["accuracy"])
    return out, outcomes


def cell_accuracy(pairs: int, seq_len: int, right: np.ndarray, seconds: float, fingerprint: str) -> dict:
    """right: [items, pairs]; fingerprint: the cell's ``Cell.fingerprint``."""
    return {"pairs": pairs, "seq_len": seq_len, "accuracy": float(right.mean()), "answers": int(right.size),
            "items_all_right": float(right.all(axis=1).mean()), "seconds": round(seconds, 2),
            "items_fingerprint": fingerprint,
            "outcomes": paired.pack_outcomes(right)}


def run_state(chunks, cfg: RunConfig, opts: EvalOptions, vocab_size: int, bar, full: dict | None = None) -> dict:
    """``full``: the mqar suite's outcomes when it ran in the same evaluation (then not computed again)."""
    from hybrid_megatron.eval.recall import answers_right, mqar_cell

    base, cells, seed = grid(cfg, opts)
    full = full or {}
    kinds = set(pat.layers(cfg.model.hybrid_layer_pattern))
    recurrent = [pat.LAYER_SYMBOLS[s] for s in (pat.MAMBA, pat.GDN) if s in kinds]  # the layer types the SSM cut restarts
    conditions = bool(recurrent) + (pat.ATTENTION in kinds)
    announce(bar, sum((conditions + (cell not in full)) * opts.items * cell[1] for cell in cells))
    out = {"seed": seed, "items_per_cell": opts.items, "attention_window": opts.attention_window, "cells": []}
    for pairs, seq_len in cells:
        cell = mqar_cell(base, pairs, seq_len, opts.items, seed)
        run = {"full": full.get((pairs, seq_len)), "ssm_cut": None, "attention_cut": None}
        cuts = {"full": None, "ssm_cut": {name: cell.query_start for name in recurrent} or None,
                "attention_cut": ({"attention": cell.query_start - opts.attention_window}
                                  if pat.ATTENTION in kinds else None)}
        for name, cut in cuts.items():
            if (name == "full" and run["full"] is not None) or (name != "full" and cut is None):
                continue
            run[name] = answers_right(chunks, cfg, cell, vocab_size, base.pad_id, base.eos_id, cfg.data.longest_seq_len,
                                      cut=cut)
            bar.update(cell.tokens.size)
        out["cells"].append(state_cell(pairs, seq_len, run, cell.fingerprint))
    return out


def state_cell(pairs: int, seq_len: int, run: dict[str, np.ndarray | None], fingerprint: str) -> dict:
    """Accuracy per condition, and per cut the reliance score and McNemar's test against the full model (over
    items, and over answers); run: [items, pairs] outcomes per condition, None where not applicable."""
    full = run["full"]
    acc_full = float(full.mean())
    row = {"pairs": pairs, "seq_len": seq_len, "answers": int(full.size), "items_fingerprint": fingerprint,
           "accuracy": {"full": acc_full},
           "outcomes": {name: paired.pack_outcomes(right) for name, right in run.items() if right is not None}}
    for name in ("ssm_cut", "attention_cut"):
        cut = run.get(name)
        if cut is None:
            row[name] = "not applicable: the model has no such layers"
            continue
        acc = float(cut.mean())
        row["accuracy"][name] = acc
        row[name] = {"reliance": paired.reliance(acc_full, acc), "mcnemar_items": paired.mcnemar_items(full, cut),
                     "mcnemar": paired.mcnemar_exact(full.ravel().tolist(), cut.ravel().tolist())}
    return row
