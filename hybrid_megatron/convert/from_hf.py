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
from hybrid_megatron.checkpoint import offline
from hybrid_megatron.convert import mapping
from hybrid_megatron.convert.hf_config import model_config_from_hf
from hybrid_megatron.convert.safetensors_stream import INDEX_NAME

log = logging.getLogger(__name__)

class _HFReader:
    """Lazy per-tensor reads of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        index = hf_dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            raw = {key: hf_dir / name for key, name in weight_map.items()}
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
                raw = {key: hf_dir / "model.safetensors" for key in f.keys()}
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
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(self._stored_name[key])  # type: ignore[attr-defined]


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
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    hf = json.loads(config_path.read_text())
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

    offline.prepare_empty_dir(save_dir, overwrite)
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

    step_dir = offline.save_model_only(save_dir, offline.sharded_model_state(tensors, dims), to_dict(cfg))
    log.info("imported %s -> %s: %d tensors, padded vocab %d, %.1f s", hf_dir, step_dir, len(tensors), padded,
             time.perf_counter() - start)
    return step_dir
