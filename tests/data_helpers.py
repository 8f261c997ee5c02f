"""Shared fixtures for the data-pipeline tests: tiny random corpora prepared into sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.prepare import PrepareOptions, prepare_data

ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,\n"))


def random_docs(seed: int, num_docs: int, mean_len: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(mean_len // 4, mean_len * 2, size=num_docs)
    return ["".join(rng.choice(ALPHABET, size=int(n))) for n in lens]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def make_source(root: Path, name: str, seed: int, num_docs: int = 300, mean_len: int = 700,
                files: int = 3, **opts) -> Path:
    """Random documents in ``files`` jsonl files, prepared with the bytes tokenizer into ``root/name``."""
    docs = random_docs(seed, num_docs, mean_len)
    for i in range(files):
        write_jsonl(root / "raw" / name / f"part-{i}.jsonl", docs[i::files])
    out = root / name
    kw = dict(member_tokens=65536, workers=1, progress=False)
    kw.update(opts)
    prepare_data(PrepareOptions(inputs=[str(root / "raw" / name / "*.jsonl")], output=str(out), source=name, **kw))
    return out


def mix_config(sources: dict[str, Path], **over) -> DataConfig:
    """Two phases (a/b mix, then an anneal on c with replay) and a short curriculum, in tokens."""
    d = {
        "seed": 7,
        "global_batch_tokens": 4096,
        "seq_len": 256,
        "sources": {k: str(v) for k, v in sources.items()},
        "phases": [
            {"name": "pretrain", "tokens": 60000, "weights": {"a": 0.7, "b": 0.3}},
            {"name": "anneal", "tokens": 20000, "weights": {"c": 1.0}, "replay": 0.5},
        ],
        "curriculum": {"min_seq_len": 64, "max_seq_len": 256, "schedule": "fixed_linear", "total_tokens": 30000,
                       "step": 64},
        "batch_size_multiple": 4,
    }
    d.update(over)
    return DataConfig.from_dict(d)
