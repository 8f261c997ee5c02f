"""Shared pieces of the data benchmarks (``benchmarks/loader_throughput.py``, ``benchmarks/data_scale.py``)."""

from __future__ import annotations

import time

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader


def run_loader(sources: dict[str, str], seq_len: int, gbt: int, steps: int) -> dict:
    cfg = DataConfig.from_dict({"seed": 1, "global_batch_tokens": gbt, "seq_len": seq_len, "sources": sources,
                                "phases": [{"name": "pretrain", "tokens": gbt * (steps + 1),
                                            "weights": {"code": 0.6, "tests": 0.4}}]})
    loader = build_loader(cfg, 0, 1)
    next(loader)  # opens files; not timed
    samples = tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(loader)
        samples += b.input_ids.shape[0]
        tokens += b.num_tokens
    seconds = time.perf_counter() - t0
    loader.close()
    return {"seq_len": seq_len, "global_batch_tokens": gbt, "steps": steps, "samples": samples, "tokens": tokens,
            "seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}
