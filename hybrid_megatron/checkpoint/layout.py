"""The checkpoint directory layout, in one place: step directory names, what makes one complete, the
atomic commit (tmp dir + rename + fsync, then ``latest`` by rename), pruning and resolution of a path
given by a user. Training (``checkpoint/live.py``), ``convert`` and the tools all go through it, so an
unfinished ``step-N.tmp`` is never read as a checkpoint anywhere.

Layout under ``save_dir``::

    latest                 the name of the last complete step dir (replaced by rename, never edited)
    step-000100/           megatron dist_checkpointing (torch_dist): model + optimizer + scheduler
        .metadata          torch_dist's index of the shards (written last by megatron's save)
        run_config.yaml    the resolved run config (a model-only save: its ``model:`` section)
        train_state.json   step, tokens, data-loader state, skipped steps (``weights_only`` for model-only)
        data_tokenizer.json  the data's tokenizer: kind, vocab size, EOS id, fingerprint (training saves)
        rng/rank-00000.pt  python/numpy/torch/cuda + megatron tracker RNG states of each rank

A save writes ``step-N.tmp/``; once every rank has finished (barrier, or the async finalizer),
rank 0 writes the small files, renames the dir to ``step-N`` and then replaces ``latest`` through a
temp file + ``os.replace``. A crash at any point leaves ``latest`` naming a complete checkpoint.
A step dir is complete when its name is ``step-N`` (no ``.tmp``) and it holds ``.metadata`` and
``train_state.json``. Pure file logic: runs on CPU.
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
METADATA = ".metadata"
RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.json"
DATA_TOKENIZER = "data_tokenizer.json"  # the tokenizer of the data the run trained on (kind, vocab, EOS, fingerprint)
TMP_SUFFIX = ".tmp"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def tmp_dir_name(step: int) -> str:
    return step_dir_name(step) + TMP_SUFFIX


def is_complete(step_dir: Path) -> bool:
    """A committed step dir: ``step-N`` (not ``.tmp``) with torch_dist's ``.metadata`` and ``train_state.json``."""
    step_dir = Path(step_dir)
    return bool(_STEP_RE.match(step_dir.name)) and (step_dir / METADATA).is_file() and (step_dir / TRAIN_STATE).is_file()


def read_latest(save_dir: Path) -> Path | None:
    """The step dir ``latest`` names, or None when there is no checkpoint yet."""
    pointer = Path(save_dir) / LATEST
    if not pointer.exists():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{pointer}: unreadable pointer file ({exc}); it should hold a step dir name") from None
    if not _STEP_RE.match(name):
        raise ConfigError(f"{pointer} names {name[:80]!r}, which is not a step dir name (step-NNNNNN)")
    target = Path(save_dir) / name
    if not is_complete(target):
        raise ConfigError(f"{pointer} names {name!r}, which is not a complete checkpoint in {save_dir}")
    return target


def resolve_step_dir(path: str | Path, what: str = "") -> Path:
    """A complete step dir, or a save dir whose ``latest`` is followed; ``what`` (e.g. ``checkpoint.load=``)
    precedes the path in errors."""
    path = Path(path)
    if path.name.endswith(TMP_SUFFIX) and _STEP_RE.match(path.name[: -len(TMP_SUFFIX)]):
        raise ConfigError(f"{what}{path}: an unfinished save (a '{TMP_SUFFIX}' dir), not a checkpoint")
    if not path.is_dir():
        raise ConfigError(f"{what}{path}: no such checkpoint directory")
    if is_complete(path):
        return path
    latest = read_latest(path)
    if latest is None:
        raise ConfigError(f"{what}{path}: no checkpoint there (neither a complete step dir with {METADATA} and "
                          f"{TRAIN_STATE}, nor a save dir with '{LATEST}')")
    return latest


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def step_files(run_config_yaml: str, train_state: dict, tokenizer: dict | None = None) -> dict[str, str]:
    """The small files of a step dir, by name."""
    files = {RUN_CONFIG: run_config_yaml, TRAIN_STATE: json.dumps(train_state, indent=1, sort_keys=True) + "\n"}
    if tokenizer is not None:
        files[DATA_TOKENIZER] = json.dumps(tokenizer, indent=1, sort_keys=True) + "\n"
    return files


def read_data_tokenizer(step_dir: Path) -> dict | None:
    """The recorded tokenizer of the run's data, or None (model-only saves and older checkpoints)."""
    path = Path(step_dir) / DATA_TOKENIZER
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("vocab_size"), int) or not isinstance(info.get("kind"), str):
        raise ConfigError(f"{path}: needs 'kind' and an integer 'vocab_size'")
    return info


def commit(save_dir: Path, tmp_dir: Path, step: int, files: dict[str, str], keep_last: int | None) -> Path:
    """Rank 0 only, after every rank's shards are written: the small files, rename tmp -> step dir, then
    repoint ``latest`` atomically."""
    for name, text in files.items():
        _fsync_write(tmp_dir / name, text)
    final = save_dir / step_dir_name(step)
    if final.exists():  # a re-run of the same step (e.g. after a crash past the rename): replace it
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    point_latest(save_dir, final)
    if keep_last:
        prune(save_dir, keep_last)
    return final


def point_latest(save_dir: Path, step_dir: Path) -> None:
    """Repoints ``latest`` by temp file + rename (a reader never sees a half-written pointer), durably."""
    pointer_tmp = save_dir / f".{LATEST}{TMP_SUFFIX}"
    _fsync_write(pointer_tmp, step_dir.name + "\n")
    os.replace(pointer_tmp, save_dir / LATEST)
    dir_fd = os.open(save_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames durable
    finally:
        os.close(dir_fd)


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
    for p in Path(save_dir).glob(f"step-*{TMP_SUFFIX}"):
        log.warning("removing incomplete checkpoint %s (interrupted save)", p)
        shutil.rmtree(p, ignore_errors=True)


def read_train_state(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / TRAIN_STATE).read_text())
