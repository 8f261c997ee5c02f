"""Loader throughput per process beside raw zstd decompression of the same shards.

    python benchmarks/loader_throughput.py [--data data/sample] [--steps 60]

Builds the sample corpus if missing (``ensure_sample_data``), then for seq 256 and seq 4096 runs one
loader process (dp_rank 0 of dp_size 1, inline, no workers) over the ``code`` and ``tests`` sources and
reports samples/s and tokens/s; the baseline decompresses every member of those shards once
(tokens/s). Prints a table; ``--out F`` writes the JSON (recorded results: ``benchmarks/results/loader_throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import zstandard


from data_pipeline.sample_data import ensure_sample_data
from data_pipeline.shards import SourceIndex
from hybrid_megatron.devtools.data_bench import run_loader


def raw_decompress(paths: list[str]) -> dict:
    dctx = zstandard.ZstdDecompressor()
    tokens = 0
    t0 = time.perf_counter()
    for p in paths:
        ix = SourceIndex.open(p)
        for shard_no, shard in enumerate(ix.shard_paths):
            blob = Path(shard).read_bytes()
            for m in np.flatnonzero(ix.member_shard == shard_no):
                off, size = int(ix.member_offset[m]), int(ix.member_size[m])
                tokens += len(dctx.decompress(blob[off:off + size])) // ix.dtype.itemsize
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/sample")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="write the result JSON here (e.g. benchmarks/results/loader_throughput.json "
                    "to record it); default: print the table only")
    args = ap.parse_args()
    paths = ensure_sample_data(args.data, progress=False)
    sources = {k: paths[k] for k in ("code", "tests")}
    raw = raw_decompress(list(sources.values()))
    # 1 step = 65536 tokens at seq 256 (256 samples), 262144 at seq 4096 (64 samples)
    rows = [run_loader(sources, 256, 65536, args.steps), run_loader(sources, 4096, 262144, args.steps // 2)]
    print(f"{'case':<22}{'samples/s':>12}{'tokens/s':>14}{'x raw zstd':>12}")
    print(f"{'raw zstd decompress':<22}{'':>12}{raw['tokens_per_s']:>14,.0f}{1.0:>12.3f}")
    for r in rows:
        r["ratio_to_raw_zstd"] = r["tokens_per_s"] / raw["tokens_per_s"]
        print(f"{'loader seq ' + str(r['seq_len']):<22}{r['samples_per_s']:>12,.0f}{r['tokens_per_s']:>14,.0f}"
              f"{r['ratio_to_raw_zstd']:>12.3f}")
    import os

    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "machine": {
        "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "zstandard": zstandard.__version__},
        "config": {"sources": {k: str(v) for k, v in sources.items()}, "weights": {"code": 0.6, "tests": 0.4},
                   "dp_size": 1, "num_workers": 0},
        "raw_zstd": raw, "loader": rows,
        "targets": {"seq256_samples_per_s": 1000, "seq4096_tokens_per_s": 1_000_000},
        "meets_targets": rows[0]["samples_per_s"] > 1000 and rows[1]["tokens_per_s"] > 1_000_000}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
