"""Hugging Face NemotronH directory -> torch_dist checkpoint that ``pretrain`` starts from.

Writes ``<save_dir>/step-000000/`` (megatron dist_checkpointing, torch_dist) with ``run_config.yaml``
holding the model section derived from the HF config and ``train_state.json`` =
``{"weights_only": true, "step": 0}``, then points ``<save_dir>/latest`` at it. Weights only: the
optimizer starts fresh. The embedding and output rows are zero-padded to the trainer's padded vocab
(a multiple of ``make_vocab_size_divisible_by``, independent of TP), as megatron itself fills rows it
finds missing. A_log, D and dt_bias are stored fp32, everything else in ``--dtype``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from data_pipeline.errors import ConfigError, DataError
from hybrid_megatron.config_io import to_dict
from hybrid_megatron.checkpoint import layout, offline
from hybrid_megatron.convert import mapping
from hybrid_megatron.convert.hf_config import model_config_from_hf
from hybrid_megatron.convert.safetensors_stream import INDEX_NAME
from hybrid_megatron.convert.staging import check_output, staged_output

log = logging.getLogger(__name__)

class _HFReader:
    """Lazy per-tensor reads of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / INDEX_NAME
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise DataError(f"{index}: no 'weight_map' mapping (not a safetensors index)")
            raw = {key: _inside(hf_dir, name, index) for key, name in weight_map.items()}
        elif (hf_dir / "model.safetensors").is_file():
            raw = {key: hf_dir / "model.safetensors" for key in _open(hf_dir / "model.safetensors").keys()}
        else:
            raise DataError(f"{hf_dir}: no model.safetensors or {INDEX_NAME} (only safetensors checkpoints convert)")
        for path in set(raw.values()):
            if not path.is_file():
                raise DataError(f"{index}: names {path.name}, which is missing")
        # keys normalised to the "backbone." prefix; remember the stored name
        self.files = {mapping.strip_hf_prefix(key): path for key, path in raw.items()}
        self._stored_name = {mapping.strip_hf_prefix(key): key for key in raw}
        self._open: dict[Path, object] = {}

    def read(self, key: str):
        path = self.files[key]
        if path not in self._open:
            self._open[path] = _open(path)
        try:
            return self._open[path].get_tensor(self._stored_name[key])  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001  (safetensors' own error types: a damaged file is one line)
            raise DataError(f"{path}: cannot read tensor {self._stored_name[key]} ({exc})") from None


def _open(path: Path):
    """safe_open of a safetensors file; DataError naming it when it is truncated or not safetensors."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001  (SafetensorError and OSError alike)
        raise DataError(f"{path}: truncated or not a safetensors file ({str(exc).splitlines()[0]})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be an object, got {type(data).__name__}")
    return data


def _inside(root: Path, name: str, source: Path) -> Path:
    """``root / name`` when it stays inside ``root`` (an index must not point elsewhere on the disk)."""
    path = (root / name).resolve()
    if not isinstance(name, str) or root.resolve() not in path.parents:
        raise DataError(f"{source}: shard name {name!r} points outside {root}")
    return path


def import_hf(
    hf_dir: str | Path,
    save_dir: str | Path,
    *,
    dtype: str = "bf16",
    overwrite: bool = False,
    make_vocab_size_divisible_by: int = 128,
) -> Path:
    """Converts; returns the written step dir."""
    import torch

    from hybrid_megatron.model.build import padded_vocab_size

    start = time.perf_counter()
    if dtype not in ("bf16", "fp32"):
        raise ConfigError(f"--dtype {dtype}: must be bf16 or fp32")
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    check_output(save_dir, [hf_dir], overwrite)  # before anything is read
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    hf = _read_json(config_path)
    cfg = model_config_from_hf(hf, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    reader = _HFReader(hf_dir)
    groups = mapping.model_groups(cfg)
    expected = {key for g in groups for key in g.hf_keys}
    missing = sorted(expected - set(reader.files))
    if missing:
        raise DataError(f"{hf_dir}: no tensor {missing[0]} ({len(missing)} missing) for pattern {cfg.hybrid_layer_pattern!r}")
    unknown = sorted(set(reader.files) - expected)
    if unknown:
        raise DataError(f"{hf_dir}: tensor {unknown[0]} has no megatron mapping ({len(unknown)} such keys)")

    padded = padded_vocab_size(cfg.vocab_size, cfg, 1)
    params_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    dims = mapping.Dims.of(cfg)
    shapes = mapping.expected_megatron_shapes(cfg, padded)
    tensors: dict[str, torch.Tensor] = {}
    for group in groups:
        meg = group.to_megatron([reader.read(k) for k in group.hf_keys])
        for key, tensor in zip(group.meg_keys, meg):
            if group.kind == "vocab":
                if tensor.shape[0] != cfg.vocab_size:
                    raise DataError(f"{hf_dir}: {group.hf_keys[0]} has {tensor.shape[0]} rows, vocab_size is {cfg.vocab_size}")
                tensor = torch.cat([tensor, tensor.new_zeros(padded - tensor.shape[0], *tensor.shape[1:])])
            if tuple(tensor.shape) != shapes[key]:
                raise DataError(f"{hf_dir}: {group.hf_keys} maps to {key} of shape {list(tensor.shape)}, "
                                f"config.json implies {list(shapes[key])}")
            tensors[key] = tensor.to(torch.float32 if group.kind == "ssm_fp32" else params_dtype).contiguous()

    with staged_output(save_dir, [hf_dir], overwrite) as stage:
        offline.save_model_only(stage, offline.sharded_model_state(tensors, dims), to_dict(cfg))
    step_dir = layout.resolve_step_dir(save_dir)
    log.info("imported %s -> %s: %d tensors, padded vocab %d, %.1f s", hf_dir, step_dir, len(tensors), padded,
             time.perf_counter() - start)
    return step_dir
