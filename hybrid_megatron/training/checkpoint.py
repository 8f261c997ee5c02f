"""torch_dist checkpoints with an atomic commit, and the resume logic.

Layout under ``save_dir``::

    latest                 the name of the last complete step dir (replaced by rename, never edited)
    step-000100/           megatron dist_checkpointing (torch_dist): model + optimizer + scheduler
        run_config.yaml    the resolved run config
        train_state.json   step, tokens, data-loader state, skipped steps
        rng/rank-00000.pt  python/numpy/torch/cuda + megatron tracker RNG states of each rank

A save writes ``step-N.tmp/``; once every rank has finished (barrier, or the async finalizer),
rank 0 writes the small files, renames the dir to ``step-N`` and then replaces ``latest`` through a
temp file + ``os.replace``. A crash at any point leaves ``latest`` naming a complete checkpoint.
The dir-name logic is pure and runs on CPU (tests); the save/load calls need the live model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from data_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def read_latest(save_dir: Path) -> Path | None:
    """The step dir ``latest`` names, or None when there is no checkpoint yet."""
    pointer = Path(save_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    target = Path(save_dir) / name
    if not _STEP_RE.match(name) or not (target / "train_state.json").is_file():
        raise ConfigError(f"{pointer} names {name!r}, which is not a complete checkpoint in {save_dir}")
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """A step dir, or a save dir whose ``latest`` is followed."""
    path = Path(path)
    if (path / "train_state.json").is_file():
        return path
    latest = read_latest(path) if path.is_dir() else None
    if latest is None:
        raise ConfigError(f"checkpoint.load={path}: no checkpoint there (no train_state.json, no 'latest')")
    return latest


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def commit(save_dir: Path, tmp_dir: Path, step: int, files: dict[str, str], keep_last: int | None) -> Path:
    """Rank 0 only: write the small files, rename tmp -> step dir, then repoint ``latest`` atomically."""
    for name, text in files.items():
        _fsync_write(tmp_dir / name, text)
    final = save_dir / step_dir_name(step)
    if final.exists():  # a re-run of the same step (e.g. after a crash past the rename): replace it
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    pointer_tmp = save_dir / f".{LATEST}.tmp"
    _fsync_write(pointer_tmp, final.name + "\n")
    os.replace(pointer_tmp, save_dir / LATEST)
    dir_fd = os.open(save_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make both renames durable
    finally:
        os.close(dir_fd)
    if keep_last:
        prune(save_dir, keep_last)
    return final


def _weights_only(step_dir: Path) -> bool:
    try:
        return bool(read_train_state(step_dir).get("weights_only"))
    except (OSError, ValueError):
        return False


def prune(save_dir: Path, keep_last: int) -> list[Path]:
    """Deletes training checkpoints beyond the newest ``keep_last``; never the one ``latest`` names, and
    never a weights-only one (``checkpoint.save_initial``'s initial weights: other runs start from it)."""
    latest = read_latest(save_dir)
    steps = sorted(
        (int(m.group(1)), p) for p in save_dir.iterdir()
        if (m := _STEP_RE.match(p.name)) and p.is_dir() and not _weights_only(p)
    )
    removed = []
    for _, path in steps[:-keep_last]:
        if latest is not None and path.resolve() == latest.resolve():
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def clean_stale_tmp(save_dir: Path) -> None:
    """Removes ``*.tmp`` leftovers of an interrupted save (rank 0, before a new save)."""
    for p in Path(save_dir).glob("step-*.tmp"):
        log.warning("removing incomplete checkpoint %s (interrupted save)", p)
        shutil.rmtree(p, ignore_errors=True)


def read_train_state(step_dir: Path) -> dict:
    return json.loads((step_dir / "train_state.json").read_text())


def _architecture(raw: dict) -> dict:
    """What shapes the weights, derived (``kv_channels: null`` and ``64`` are the same architecture)."""
    from hybrid_megatron.config import ModelConfig
    from hybrid_megatron.config_io import build
    from hybrid_megatron.model import pattern

    m = build(ModelConfig, raw, "model")
    return {
        "layers (pattern without cuts)": pattern.layers(m.hybrid_layer_pattern),
        "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_kv_heads,
        "kv_channels": m.head_dim,
        "mamba_num_heads": m.num_mamba_heads,
        "mamba_head_dim": m.mamba_head_dim,
        "mamba_num_groups": m.mamba_num_groups,
        "mamba_state_dim": m.mamba_state_dim,
        "mamba_conv_kernel": m.mamba_conv_kernel,
        "normalization": m.normalization,
        "add_bias_linear": m.add_bias_linear,
        "activation": m.activation,
        "position_embedding_type": m.position_embedding_type,
        "tie_embeddings": m.tie_embeddings,
        "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
    }


def check_architecture(saved_model: dict, current_model: dict, path: Path) -> None:
    """Refuses a checkpoint whose model differs in anything that shapes the weights.

    Pipeline cuts, the layer spec (TE and local write the same keys), init and chunk size may change.
    """
    saved, current = _architecture(saved_model), _architecture(current_model)
    for key in saved:
        if saved[key] != current[key]:
            raise ConfigError(
                f"checkpoint {path} has a different architecture: model.{key}={saved[key]!r} there, "
                f"{current[key]!r} in this config"
            )
    if saved_model.get("vocab_size") and current_model.get("vocab_size"):
        if saved_model["vocab_size"] != current_model["vocab_size"]:
            raise ConfigError(
                f"checkpoint {path} has a different architecture: model.vocab_size={saved_model['vocab_size']} "
                f"there, {current_model['vocab_size']} in this config"
            )
