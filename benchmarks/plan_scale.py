"""How the run plan scales with the run's length: `pretrain --dry-run` time and memory at 18T-10^18 tokens.

    python benchmarks/plan_scale.py [--config configs/pretrain_7b.yaml] [--tokens 1e11,18e12,1e14,1e18] [--out F]

Each size runs in a fresh process (so its peak resident memory is its own): the config's phases are
scaled to the total token count (their shares kept), then the dry run (schedule, LR plan, micro-batch plan,
parameters, memory estimate) is timed. Prints a table; ``--out`` also writes JSON. The plan is stored as
runs of identical steps, so neither column should grow with the number of steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT


def _measure(config: str, tokens: int, gpus: int) -> dict:
    """In this (fresh) process: scale the phases to ``tokens``, run the dry run, report time and peak RSS."""
    import dataclasses

    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.training.dry_run import describe

    cfg = load_run_config(config)
    total = sum(p.tokens for p in cfg.data.phases)
    phases = [dataclasses.replace(p, tokens=max(1, p.tokens * tokens // total)) for p in cfg.data.phases]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, phases=phases))
    start = time.perf_counter()
    report = describe(cfg, world_size=gpus)
    seconds = time.perf_counter() - start
    run_line = next(line for line in report.splitlines() if line.startswith("run: "))
    return {"tokens": tokens, "seconds": round(seconds, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "plan": run_line}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/pretrain_7b.yaml")
    ap.add_argument("--tokens", default="1e11,18e12,1e14,1e18", help="comma list of total token counts")
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_measure(args.config, int(args.worker), args.gpus)))
        return 0
    rows = []
    for tokens in (int(float(t)) for t in args.tokens.split(",")):
        proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--gpus", str(args.gpus),
                               "--worker", str(tokens)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            print(f"error: {tokens:.3g} tokens: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'tokens':>10} {'seconds':>8} {'peak RSS MB':>12}  plan")
    for r in rows:
        print(f"{r['tokens']:>10.3g} {r['seconds']:>8.2f} {r['peak_rss_mb']:>12.0f}  {r['plan']}")
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "plan_scale", "command": " ".join([Path(sys.executable).name,
                                        *sys.argv]), "machine": {"python": platform.python_version(),
                                        "processor": platform.processor() or platform.machine()},
                                        "config": args.config, "gpus": args.gpus, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
