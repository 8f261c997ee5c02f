"""Data at cluster scale on this machine: the loader from a loopback HTTP server against local disk, and
prepare-data with 1 task against 2 (datatrove's local executor).

    python benchmarks/data_scale.py [--data data/sample] [--steps 30] [--out F]

The loader case reads the sample ``code``/``tests`` sources at seq 4096 (262,144 tokens a step, one process,
no workers), once from disk and once as ``http://127.0.0.1:PORT/...`` URLs served from the same files with
byte-range requests; the target is 15 x the ~66k tokens/s one H200 trains on the 1B hybrid. The prepare
case tokenises the sample ``code`` inputs with the ``bytes`` tokenizer as 1 and as 2 tasks (one worker each).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline.prepare import PrepareOptions, prepare_data
from data_pipeline.sample_data import ensure_sample_data
from hybrid_megatron.devtools.data_bench import run_loader
from hybrid_megatron.devtools.http_server import serve_directory

TARGET = 15 * 66_000  # tokens/s: 15 x what one H200 trains per second on the 1B hybrid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/sample")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    paths = ensure_sample_data(args.data, progress=False)
    local = {k: paths[k] for k in ("code", "tests")}
    loader = {"local": run_loader(local, 4096, 262144, args.steps)}
    with serve_directory(Path(args.data).resolve()) as base:
        remote = {k: f"{base}/{Path(v).name}" for k, v in local.items()}
        loader["http_loopback"] = run_loader(remote, 4096, 262144, args.steps)
    files = sorted(glob.glob(f"{args.data}/raw/code-*.jsonl"))
    prepare = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tasks in (1, 2):
            t0 = time.perf_counter()
            stats = prepare_data(PrepareOptions(inputs=files, output=f"{tmp}/t{tasks}", source="code", tasks=tasks,
                                                workers=tasks, progress=False))
            seconds = time.perf_counter() - t0
            prepare[f"{tasks}_tasks"] = {"seconds": seconds, "tokens": stats["tokens"],
                                         "tokens_per_s": stats["tokens"] / seconds}
    print(f"{'case':<28}{'tokens/s':>14}{'x target':>10}")
    for name, r in loader.items():
        print(f"{'loader seq 4096 ' + name:<28}{r['tokens_per_s']:>14,.0f}{r['tokens_per_s'] / TARGET:>10.2f}")
    for name, r in prepare.items():
        print(f"{'prepare-data ' + name.replace('_', ' '):<28}{r['tokens_per_s']:>14,.0f}")
    ratio = loader["http_loopback"]["tokens_per_s"] / loader["local"]["tokens_per_s"]
    print(f"http loopback / local disk: {ratio:.3f}; 2 tasks / 1 task: "
          f"{prepare['2_tasks']['tokens_per_s'] / prepare['1_tasks']['tokens_per_s']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "benchmark": "data_scale", "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "loader": loader, "loader_target_tokens_per_s": TARGET, "http_over_local": ratio,
            "prepare": prepare}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
