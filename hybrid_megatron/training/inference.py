"""A megatron model built from a checkpoint outside the training loop: evaluation, fixtures, diagnostics.

``run_config_of_checkpoint`` reads the run config a checkpoint was saved with (a training save stores the
whole config; a model-only save such as ``convert from-hf`` only its ``model:`` section, so the caller
then supplies the rest). ``load_model_for_inference`` builds this rank's chunks at the current process
layout (any TP/PP: torch_dist reshards), in the run's precision (bf16 with fp32 SSM params), loads the
weights and puts the chunks in eval mode. No DDP, optimizer or loader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_pipeline.errors import ConfigError, DataError
from hybrid_megatron.checkpoint import layout
from hybrid_megatron.config import RunConfig, run_config_from_dict
from hybrid_megatron.config_io import to_dict

log = logging.getLogger(__name__)


@dataclass
class InferenceModel:
    cfg: RunConfig
    chunks: list  # this rank's model chunks (Float16Module-wrapped in bf16 runs), eval mode
    step_dir: Path
    vocab_size: int
    padded_vocab_size: int


def run_config_of_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None,
                             base: RunConfig | None = None) -> tuple[Path, RunConfig]:
    """(step dir, RunConfig) of a checkpoint: its stored config with ``overrides`` applied (``parallel.*``
    to load at another layout). A model-only checkpoint stores only ``model:``: ``base`` supplies the rest."""
    step_dir = layout.resolve_step_dir(checkpoint)
    path = step_dir / layout.RUN_CONFIG
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise DataError(f"{path}: missing or without a 'model:' section")
    if "data" not in raw:
        if base is None:
            raise ConfigError(f"{step_dir} is a model-only checkpoint (no data section in {layout.RUN_CONFIG}): "
                              "pass a run config for the rest")
        raw = {**to_dict(base), "model": raw["model"]}
    return step_dir, run_config_from_dict(raw, overrides)


def load_model_for_inference(cfg: RunConfig, step_dir: str | Path, max_seq_len: int | None = None) -> InferenceModel:
    """Builds the model of ``cfg`` on this rank and loads ``step_dir``'s weights (process groups initialized)."""
    from hybrid_megatron.checkpoint.architecture import check_architecture
    from hybrid_megatron.checkpoint.live import load_model_weights
    from hybrid_megatron.model.build import build_model_chunks, padded_vocab_size
    from hybrid_megatron.training.setup import half_precision

    step_dir = Path(step_dir)
    saved = yaml.safe_load((step_dir / layout.RUN_CONFIG).read_text()) or {}
    check_architecture(saved.get("model", {}), to_dict(cfg.model), step_dir)
    vocab = checkpoint_vocab_size(cfg, step_dir)
    if max_seq_len is None:
        max_seq_len = cfg.data.longest_seq_len
    # wrapped first, as in training: the fp32 SSM params then receive the checkpoint's fp32 values
    chunks = [half_precision(cfg, chunk) for chunk in build_model_chunks(cfg, vocab, max_seq_len)]
    load_model_weights(chunks, step_dir)
    for chunk in chunks:
        chunk.eval()
    log.info("loaded %s for inference (%d chunk(s) on this rank)", step_dir, len(chunks))
    tp = cfg.parallel.tensor_model_parallel_size
    return InferenceModel(cfg, chunks, step_dir, vocab, padded_vocab_size(vocab, cfg.model, tp))


def checkpoint_vocab_size(cfg: RunConfig, step_dir: Path) -> int:
    """The config's vocabulary, else the padded one stored in the checkpoint (reads only its metadata)."""
    return cfg.model.vocab_size or _embedding_rows(step_dir)


def _embedding_rows(step_dir: Path) -> int:
    """The padded vocabulary stored in the checkpoint (when the config does not name the tokenizer's)."""
    from hybrid_megatron.checkpoint.offline import CheckpointReader

    shape = CheckpointReader(step_dir).tensors.get("embedding.word_embeddings.weight")
    if shape is None:
        raise DataError(f"{step_dir}: no embedding.word_embeddings.weight: not a model checkpoint of this project")
    return shape[0][0]
