"""The suites ``hybrid-megatron eval`` knows, what each needs, and the options they share.

``ppl`` and ``length`` run through the megatron forward (any TP/PP/DP) on the validation data of the
checkpoint's data config; ``lm-eval`` exports the checkpoint to Hugging Face and runs EleutherAI's harness
on one GPU. Parsing and checking happen here, before any GPU work, so that every mistake is one line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    megatron: bool  # runs through the megatron forward (else on the exported Hugging Face model)
    needs_validation: bool
    summary: str


SUITES = {s.name: s for s in (
    Suite("ppl", True, True, "loss and perplexity per validation source"),
    Suite("length", True, True, "loss by token position for sequences of 1x, 2x, 4x and 8x the training length"),
    Suite("lm-eval", False, False, "EleutherAI's lm-evaluation-harness on the exported Hugging Face model"),
    Suite("mqar", True, False, "multi-query associative recall accuracy by key-value pairs and sequence length "
                               "(a model trained on prepare-data --synthetic mqar)"),
    Suite("state", True, False, "MQAR with the SSM state cut and with attention cut before the queries: accuracy, "
                                "memory-reliance scores, McNemar's exact test"),
    Suite("niah", True, True, "pass-key retrieval at depths 0-100% of contexts of 1x-8x the training length "
                              "(filler: the validation data), accuracy heatmap"),
    Suite("generation", True, True, "continuations of held-out prompts at temperatures 0, 0.7, 1.0: distinct-n, "
                                    "repetition, length before EOS, samples"),
)}


@dataclass(kw_only=True)
class EvalOptions:
    suites: list[str]
    lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """``length``: multiples of the training sequence length."""
    bin_size: int | None = None
    """``length``: positions per bin; None: an eighth of the training length."""
    length_tokens: int | None = None
    """``length``: tokens per length (split over the validation sources); None: data.validation.tokens."""
    tasks: list[str] = field(default_factory=list)
    """``lm-eval``: task names (the harness's own, or defined under ``task_dir``)."""
    task_dir: Path | None = None
    """``lm-eval``: a directory of task YAMLs; relative data files in them resolve against it."""
    limit: int | None = None
    """``lm-eval``: at most this many documents per task."""
    num_fewshot: int | None = None
    batch_size: int = 8
    kv_pairs: list[int] | None = None
    """``mqar``/``state``: key-value pairs per item; None: the training source's."""
    seq_lens: list[int] | None = None
    """``mqar``/``state``: item lengths; None: the training source's."""
    items: int = 512
    """``mqar``/``state``: items per (pairs, length) cell."""
    seed: int | None = None
    """``mqar``/``state``: the items' seed; None: the training source's plus an offset (never one it used)."""
    attention_window: int = 0
    """``state``: tokens before the first query that attention still sees under the attention cut."""
    niah_items: int = 8
    """``niah``: pass keys per (length, depth) cell."""
    niah_depths: int = 11
    """``niah``: depths, evenly from 0% to 100%."""
    prompts: int = 32
    """``generation``: held-out prompts."""
    prompt_tokens: int = 128
    """``generation``: tokens per prompt."""
    max_new_tokens: int = 200
    """``generation``: tokens per continuation at most."""
    progress: bool = True


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ConfigError(f"{what} {text!r}: expected a comma-separated list without empty items")
    if len(set(items)) != len(items):
        raise ConfigError(f"{what} {text!r}: names an item twice")
    return items


def parse_suites(text: str) -> list[str]:
    names = parse_list(text, "--suite")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ConfigError(f"--suite: unknown suite {unknown[0]!r} (known: {', '.join(SUITES)})")
    return names


def parse_ints(text: str, flag: str, what: str = "a positive integer") -> list[int]:
    out = []
    for item in parse_list(text, flag):
        if not item.isdigit() or int(item) < 1:
            raise ConfigError(f"{flag}: {item!r} is not {what}")
        out.append(int(item))
    return sorted(out)


def parse_lengths(text: str) -> list[int]:
    return parse_ints(text, "--lengths", "a positive whole multiple of the training length")


def check_options(opts: EvalOptions) -> None:
    """Everything about the options alone that can be wrong (the checkpoint is checked later)."""
    if opts.bin_size is not None and opts.bin_size < 1:
        raise ConfigError(f"--bin-size {opts.bin_size}: must be at least 1")
    if opts.length_tokens is not None and opts.length_tokens < 1:
        raise ConfigError(f"--length-tokens {opts.length_tokens}: must be positive")
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size {opts.batch_size}: must be at least 1")
    if opts.limit is not None and opts.limit < 1:
        raise ConfigError(f"--limit {opts.limit}: must be at least 1")
    if opts.items < 1:
        raise ConfigError(f"--items {opts.items}: must be at least 1")
    if opts.attention_window < 0:
        raise ConfigError(f"--attention-window {opts.attention_window}: must be >= 0")
    for flag, value in (("--niah-items", opts.niah_items), ("--niah-depths", opts.niah_depths),
                        ("--prompts", opts.prompts), ("--prompt-tokens", opts.prompt_tokens),
                        ("--max-new-tokens", opts.max_new_tokens)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if "lm-eval" in opts.suites:
        if not opts.tasks:
            raise ConfigError("--suite lm-eval needs --tasks (lm-evaluation-harness task names)")
        if opts.task_dir is not None and not opts.task_dir.is_dir():
            raise ConfigError(f"--task-dir {opts.task_dir}: no such directory")
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--suite lm-eval needs lm-evaluation-harness: pip install 'hybrid-megatron[eval]'")
    elif opts.tasks or opts.task_dir is not None:
        raise ConfigError("--tasks/--task-dir are options of --suite lm-eval, which is not selected")


def needs_validation(opts: EvalOptions) -> list[str]:
    return [n for n in opts.suites if SUITES[n].needs_validation]


def megatron_suites(opts: EvalOptions) -> list[str]:
    return [n for n in opts.suites if SUITES[n].megatron]
