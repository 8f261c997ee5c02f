"""torch_dist checkpoint -> Hugging Face NemotronH directory, streamed, on CPU.

Order of work: resolve the step dir, read its model section, refuse what NemotronH cannot express
(before anything is written), check every expected key and shape against the checkpoint metadata, then
stream tensor groups (read -> map -> cast -> write) into pre-planned safetensors shards, and finally
write config.json, generation_config.json and the tokenizer. Peak memory is about one tensor group
(the embedding or lm_head, as stored) plus its converted copy.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import ConfigError, DataError
from hybrid_megatron.checkpoint import layout, offline
from hybrid_megatron.convert import mapping
from hybrid_megatron.convert.checks import check_exportable, hf_cuda_conv_problem
from hybrid_megatron.convert.hf_config import to_hf_config
from hybrid_megatron.convert.safetensors_stream import ShardWriter, plan_shards, write_index
from hybrid_megatron.convert.staging import check_output, staged_output

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ExportOptions:
    dtype: str = "bf16"
    """bf16 or fp32 for every tensor but A_log, D, dt_bias (always written fp32, as trained)."""
    tokenizer: str | None = None
    """A tokenizer dir or cached hub name whose files are copied in; default: the tokenizer the checkpoint
    records for its data (the ``bytes`` one is written as HF files), and its size sets the vocab."""
    overwrite: bool = False
    keep_vocab_padding: bool = False
    max_shard_bytes: int = 2 * 1024**3
    progress: bool = True


def _load_tokenizer(name: str):
    """A local tokenizer directory, or a hub name already in the local Hugging Face cache (never a download:
    an export must not hang on network retries)."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    local = path.is_dir()
    if not local and (path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1):
        raise ConfigError(f"--tokenizer {name}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(str(path) if local else name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if local:
            raise ConfigError(f"--tokenizer {name}: cannot load a tokenizer from that directory "
                              f"({str(exc).splitlines()[0]})") from None
        raise ConfigError(f"--tokenizer {name}: not a local directory and not in the Hugging Face cache; "
                          "download it first or pass its directory") from None


def _recorded_tokenizer(step_dir: Path, recorded: dict | None):
    """The tokenizer to write (or None) from the checkpoint's record of its data's tokenizer."""
    if recorded is None:
        return None
    if recorded["kind"] == "bytes":
        from hybrid_megatron.convert.byte_tokenizer import byte_tokenizer

        return byte_tokenizer()
    path = recorded.get("path")
    if recorded["kind"] == "hf" and path and Path(path).is_dir():
        from data_pipeline.tokenizer import HFTokenizer

        if HFTokenizer(path).describe()["fingerprint"] != recorded.get("fingerprint"):
            raise ConfigError(f"the data's tokenizer at {path} changed since training (fingerprint differs from "
                              f"{step_dir / layout.DATA_TOKENIZER}): pass the original with --tokenizer")
        return _load_tokenizer(path)
    log.warning("the data's tokenizer (%s) is not at %s any more: exporting without tokenizer files (pass "
                "--tokenizer to include them)", recorded["kind"], path)
    return None


def _resolve_vocab(cfg, padded: int, tokenizer, recorded_vocab: int | None, keep_padding: bool) -> int:
    """Rows to write: the padded rows with ``keep_padding``, else the config's, the recorded data tokenizer's
    or the given tokenizer's vocabulary."""
    vocab = cfg.vocab_size or recorded_vocab
    if tokenizer is not None:
        n = len(tokenizer)
        if vocab is not None and n > vocab:
            raise ConfigError(f"the tokenizer has {n} tokens but the model embeds only a vocabulary of {vocab}")
        vocab = vocab if vocab is not None else n
    if vocab is None and not keep_padding:
        raise ConfigError(
            "the checkpoint records neither model.vocab_size nor the data's tokenizer: pass --tokenizer (its size "
            "is the vocab) or --keep-vocab-padding"
        )
    if vocab is not None and vocab > padded:
        raise DataError(f"model.vocab_size={vocab} exceeds the checkpoint's {padded} embedding rows")
    return padded if keep_padding else vocab


def export(ckpt_dir: str | Path, out_dir: str | Path, opts: ExportOptions) -> dict:
    """Converts; returns a summary (paths, tensor count, bytes, seconds)."""
    import torch

    start = time.perf_counter()
    if opts.dtype not in ("bf16", "fp32"):
        raise ConfigError(f"--dtype {opts.dtype}: must be bf16 or fp32")
    if opts.max_shard_bytes < 1:
        raise ConfigError(f"--max-shard-size-gb: must be > 0 (got {opts.max_shard_bytes} bytes)")
    check_output(Path(out_dir), [Path(ckpt_dir)], opts.overwrite)  # before anything is read
    step_dir = layout.resolve_step_dir(ckpt_dir)
    cfg = offline.load_model_config(step_dir)
    check_exportable(cfg)  # before anything is read or written
    recorded = layout.read_data_tokenizer(step_dir)
    recorded_vocab = recorded["vocab_size"] if recorded else None
    tokenizer = _load_tokenizer(opts.tokenizer) if opts.tokenizer else _recorded_tokenizer(step_dir, recorded)

    reader = offline.CheckpointReader(step_dir)
    emb = reader.tensors.get("embedding.word_embeddings.weight")
    if emb is None:
        raise DataError(f"{step_dir}: no embedding.word_embeddings.weight: not a model checkpoint of this project")
    padded = emb[0][0]
    vocab = _resolve_vocab(cfg, padded, tokenizer, recorded_vocab, opts.keep_vocab_padding)
    _check_keys(reader, cfg, padded, step_dir)

    cuda_problem = hf_cuda_conv_problem(cfg)
    if cuda_problem:
        log.warning("%s", cuda_problem)
    out_dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    groups = mapping.model_groups(cfg)
    entries = []
    for group in groups:
        dtype = torch.float32 if group.kind in ("ssm_fp32", "hf_fp32") else out_dtype
        for shape, hf_key in zip(_hf_shapes(group, reader, vocab), group.hf_keys):
            entries.append((hf_key, shape, dtype))
    shards = plan_shards(entries, opts.max_shard_bytes)
    by_key = {name: (i, dtype) for i, s in enumerate(shards) for name, _, dtype in s.entries}

    out_dir = Path(out_dir)
    with staged_output(out_dir, [Path(ckpt_dir), step_dir], opts.overwrite) as stage:
        _write_hf(stage, groups, reader, shards, by_key, vocab, opts.progress)
        _write_configs(stage, cfg, vocab, opts.dtype, tokenizer)
    seconds = time.perf_counter() - start
    summary = {"step_dir": str(step_dir), "out_dir": str(out_dir), "tensors": len(entries),
               "bytes": sum(s.num_bytes for s in shards), "shards": len(shards), "vocab_size": vocab,
               "seconds": round(seconds, 2)}
    log.info("exported %s -> %s: %d tensors, %.1f MB in %d shard(s), %.1f s", step_dir, out_dir, len(entries),
             summary["bytes"] / 1e6, len(shards), seconds)
    return summary


def _write_hf(out_dir: Path, groups, reader, shards, by_key: dict, vocab: int, progress: bool) -> None:
    """Streams every tensor group into its planned safetensors shard, then writes the index."""
    from tqdm import tqdm

    writers: dict[int, ShardWriter] = {}
    bar = tqdm(total=sum(s.num_bytes for s in shards), unit="B", unit_scale=True, disable=not progress, desc="to-hf")
    for group in groups:
        hf_tensors = group.to_hf(reader.read(group.meg_keys))
        for hf_key, tensor in zip(group.hf_keys, hf_tensors):
            if group.kind == "vocab":
                tensor = tensor[:vocab]
            shard_idx, dtype = by_key[hf_key]
            if shard_idx not in writers:
                for done in [i for i in writers if i < shard_idx]:
                    writers.pop(done).close()
                writers[shard_idx] = ShardWriter(out_dir / shards[shard_idx].file_name, shards[shard_idx])
            tensor = tensor.to(dtype)
            writers[shard_idx].write(hf_key, tensor)
            bar.update(tensor.numel() * tensor.element_size())
        del hf_tensors
    for writer in writers.values():
        writer.close()
    bar.close()
    write_index(out_dir, shards)


def _check_keys(reader: offline.CheckpointReader, cfg, padded: int, step_dir: Path) -> None:
    """Every expected key with its global shape; no unknown model key (a weight we would drop)."""
    expected = mapping.expected_megatron_shapes(cfg, padded)
    for key, shape in expected.items():
        if key not in reader.tensors:
            raise DataError(f"{step_dir}: checkpoint lacks {key} (model.hybrid_layer_pattern={cfg.hybrid_layer_pattern!r})")
        if reader.tensors[key][0] != shape:
            raise DataError(
                f"{step_dir}: {key} has shape {list(reader.tensors[key][0])}, the model section implies {list(shape)}"
            )
    unknown = sorted(k for k in reader.tensors if mapping.is_model_key(k) and k not in expected
                     and not _empty_bias(k, reader.tensors[k][0]))
    if unknown:
        raise DataError(f"{step_dir}: model tensor {unknown[0]} has no NemotronH mapping ({len(unknown)} such keys)")
    other = sorted({k.split(".")[0] for k in reader.tensors if not mapping.is_model_key(k)})
    if other:
        log.info("not exported (training state): tensors under %s", ", ".join(other))


def _empty_bias(key: str, shape: tuple[int, ...]) -> bool:
    # Transformer Engine registers a zero-size ``bias`` on linears built with bias=False
    return key.endswith(".bias") and 0 in shape


def _hf_shapes(group: mapping.TensorGroup, reader: offline.CheckpointReader, vocab: int) -> list[tuple[int, ...]]:
    """The HF shapes of a group, from metadata alone (maps zero-size meta tensors, reads nothing)."""
    import torch

    metas = [torch.empty(reader.tensors[k][0], dtype=reader.tensors[k][1], device="meta") for k in group.meg_keys]
    shapes = [tuple(t.shape) for t in group.to_hf(metas)]
    if group.kind == "vocab":
        shapes = [(vocab, *s[1:]) for s in shapes]
    return shapes


def _write_configs(out_dir: Path, cfg, vocab: int, dtype: str, tokenizer) -> None:
    from transformers import GenerationConfig

    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        tokenizer.save_pretrained(str(out_dir))
    config = to_hf_config(cfg, vocab_size=vocab, dtype=dtype, **ids)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(str(out_dir))
