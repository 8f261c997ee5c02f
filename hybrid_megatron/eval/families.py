"""Which compared runs are one architecture at several sizes (``compare``): a scaling law is fitted per family.

A size sweep of one architecture changes widths, head counts and depth; a comparison of architectures changes
what the layers are. Pooling both into one L(N) fit would draw one curve through two architectures, so runs are
grouped first. Two runs are one family when

- their layer patterns repeat the same unit (``M-M-M-*-`` twice and three times over are one family: depth
  scaled by repeating the block; ``|`` cuts ignored), and
- every model field that is not a size is equal: activation, normalization, position embedding, state and head
  dims, attention window, MoE experts and routing, tied embeddings, vocabulary.

``SIZE_FIELDS`` are the fields a size sweep changes (and may change together with the width, as the
initialisation's std often is); for ``PRESENCE_FIELDS`` only whether they are set is architecture (a shared
expert or not; which attention layers stay global depends on the depth). Fields that choose an implementation
of the same function (``layer_spec``, ``attention_backend``, the vocabulary's padding, the SSD chunk size) are
not compared.
``compare --family LABEL=RUN,...`` names a family by hand where this rule does not fit (a pattern that is not a
repeated block, a recipe that changes a head dim with the width).
"""

from __future__ import annotations

import dataclasses
import json
import re

from data_pipeline.errors import ConfigError
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig

SIZE_FIELDS = frozenset({
    "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "mamba_num_heads",
    "mamba_num_groups", "gdn_num_key_heads", "gdn_num_value_heads", "moe_ffn_hidden_size", "init_method_std",
})
PRESENCE_FIELDS = frozenset({"moe_shared_expert_size", "global_attention_layers"})
# the same function computed another way: the spec, the attention kernels, the vocabulary's padding, the SSD scan's
# chunking (the chunked scan equals the sequential one)
IMPLEMENTATION_FIELDS = frozenset({"layer_spec", "attention_backend", "make_vocab_size_divisible_by",
                                   "mamba_chunk_size"})


def repeating_unit(pattern: str) -> str:
    """The shortest block whose repetition is the pattern's layers (``|`` cuts dropped): ``M*-M*-`` -> ``M*-``."""
    flat = pat.layers(pattern)
    for size in range(1, len(flat) + 1):
        if len(flat) % size == 0 and flat[:size] * (len(flat) // size) == flat:
            return flat[:size]
    return flat


def architecture(model: ModelConfig) -> dict[str, object]:
    """What makes the model's family: its pattern's repeating unit and every field that is not a size."""
    key: dict[str, object] = {"pattern unit": repeating_unit(model.hybrid_layer_pattern)}
    for f in dataclasses.fields(model):
        if f.name in SIZE_FIELDS or f.name in IMPLEMENTATION_FIELDS or f.name == "hybrid_layer_pattern":
            continue
        value = getattr(model, f.name)
        key[f.name] = value is not None if f.name in PRESENCE_FIELDS else value
    return key


def _label(key: dict, others: list[dict]) -> str:
    """The pattern unit, and the fields in which this family differs from another of the same unit."""
    differing = sorted({name for other in others if other["pattern unit"] == key["pattern unit"] and other != key
                        for name in key if key[name] != other[name]})
    extra = ", ".join(f"{name}={key[name]}" for name in differing)
    return f"{key['pattern unit']} ({extra})" if extra else str(key["pattern unit"])


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``--family LABEL=RUN[,RUN...]`` (repeatable) -> {run directory: label}."""
    assigned: dict[str, str] = {}
    for item in items or []:
        label, sep, runs = item.partition("=")
        if not sep or not label.strip() or not runs.strip():
            raise ConfigError(f"--family {item!r}: expected LABEL=RUN_DIR[,RUN_DIR...]")
        for run in (r.strip() for r in runs.split(",")):
            if not run:
                raise ConfigError(f"--family {item!r}: an empty run directory in the list")
            if run in assigned and assigned[run] != label.strip():
                raise ConfigError(f"--family: {run} is in two families ({assigned[run]!r} and {label.strip()!r})")
            assigned[run] = label.strip()
    return assigned


def group(models: dict[str, ModelConfig], assigned: dict[str, str] | None = None) -> dict[str, list[str]]:
    """{family label: run names} in the order the runs come. ``models``: run name -> its model config;
    ``assigned``: run name -> a label given by hand (those runs are not grouped by the rule)."""
    assigned = assigned or {}
    unknown = sorted(set(assigned) - set(models))
    if unknown:
        raise ConfigError(f"--family names {', '.join(unknown)}, which is not among the runs compared "
                          f"({', '.join(models)})")
    keys = {name: architecture(m) for name, m in models.items() if name not in assigned}
    distinct = [k for i, k in enumerate(keys.values()) if k not in list(keys.values())[:i]]
    labels = {name: assigned.get(name) or _label(keys[name], distinct) for name in models}
    clash = set(assigned.values()) & {labels[n] for n in keys}
    if clash:
        raise ConfigError(f"--family label {sorted(clash)[0]!r} is also the label of runs grouped by their pattern; "
                          "pick another")
    families: dict[str, list[str]] = {}
    for name in models:
        families.setdefault(labels[name], []).append(name)
    return families


# what may differ between the runs of one family without changing what is compared: where a run writes, its seeds,
# how long it trains (the data budget is the other axis of the laws), how its steps are cut into micro-batches and
# recomputed, its layout over GPUs, and how often it validates and checkpoints
_NOT_RECIPE = re.compile(
    r"^(model|logging|checkpoint|parallel|build_sample_data)\b"
    r"|^data\.(seed|num_workers|phases\[\d+\]\.tokens|curriculum\.(total_tokens|max_tokens))\b"
    r"|^train\.(seed|micro_batch_size|train_steps|exit_after_steps|recompute\w*|eval_interval|nonfinite_policy"
    r"|max_skipped_steps|deterministic)$"
    r"|^schedule\.(lr_warmup_steps|anneal_warmup_steps)$")


def recipe(config: dict) -> dict[str, str]:
    """The training recipe of a resolved run config, flattened to ``key.path: value`` (what ``_NOT_RECIPE`` leaves)."""
    flat: dict[str, str] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif not _NOT_RECIPE.match(path):
            flat[path] = json.dumps(node, sort_keys=True)

    walk(config, "")
    return flat


def recipe_differences(recipes: dict[str, dict[str, str]]) -> dict[str, dict[str, list[str]]]:
    """The recipe keys on which the runs of a family disagree: {key: {value: [runs]}} (a missing key: "-")."""
    keys = sorted({k for r in recipes.values() for k in r})
    out = {}
    for key in keys:
        values: dict[str, list[str]] = {}
        for name, r in recipes.items():
            values.setdefault(r.get(key, "-"), []).append(name)
        if len(values) > 1:
            out[key] = values
    return out
