"""Bit-for-bit regression check of a code change: the same deterministic run in two source trees.

    python tools/same_losses.py BASELINE_TREE [--steps 300] [--config configs/tiny.yaml] [--out OUT]

Runs ``python -m hybrid_megatron pretrain CONFIG train.deterministic=true train.train_steps=N`` once
with this checkout's code and once with ``BASELINE_TREE``'s (for example ``git archive REV | tar -x -C
DIR``), both at the same time on one GPU (the tiny model leaves it mostly idle; deterministic kernels do
not depend on what else runs), each from its own tree so that each builds its own sample data. Then it
compares every step's loss, grad norm, LR and token count exactly. Exit 0 when all are identical, 1 when
any differs or a run failed. ``<out>/same_losses.json`` holds both runs' records, device and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.training.environment import versions
from hybrid_megatron.devtools.gpu_launch import device_name, launch

COMPARED = ("step", "loss", "grad_norm", "lr", "tokens", "seq_len", "phase", "skipped")


def run_in(tree: Path, name: str, args: argparse.Namespace, work: Path) -> dict:
    run_dir = work / name
    overrides = [f"logging.run_dir={run_dir}", "train.deterministic=true", f"train.train_steps={args.steps}",
                 "checkpoint.save_final=false", "logging.tensorboard=false", "logging.log_interval=50"]
    code, tail = launch(1, ["-m", "hybrid_megatron", "pretrain", args.config, *overrides], args.timeout_s,
                        work / f"{name}.log", cwd=tree)  # the tree's own code first on PYTHONPATH
    losses = run_dir / "losses.jsonl"
    records = [json.loads(line) for line in losses.read_text().splitlines()] if losses.is_file() else []
    return {"tree": str(tree), "exit": code, "records": records, **({"tail": tail} if code else {})}


def compare(base: list[dict], new: list[dict]) -> list[str]:
    """Every difference, as a line; empty when the two runs are identical in every compared field."""
    out = [f"{len(base)} steps in the baseline, {len(new)} here"] if len(base) != len(new) else []
    for b, n in zip(base, new):
        diff = [k for k in COMPARED if b.get(k) != n.get(k)]
        if diff:
            out.append(f"step {b.get('step')}: " + ", ".join(f"{k} {b.get(k)!r} vs {n.get(k)!r}" for k in diff))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path, help="the source tree to compare against (its repository root)")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--timeout-s", type=float, default=540.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/same_losses"))
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "gpu_out")
    args = ap.parse_args(argv)
    if not (args.baseline / "hybrid_megatron").is_dir():
        ap.error(f"{args.baseline}: not a source tree (no hybrid_megatron/ in it)")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    args.work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        base_f = pool.submit(run_in, args.baseline.resolve(), "baseline", args, args.work)
        new_f = pool.submit(run_in, REPO_ROOT, "this", args, args.work)
        base, new = base_f.result(), new_f.result()
    problems = [f"{n} run exited {r['exit']}" for n, r in (("baseline", base), ("this", new)) if r["exit"]]
    problems += compare(base["records"], new["records"])
    result = {"tool": "same_losses", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "device": device_name(), "versions": versions(), "config": args.config, "steps": args.steps,
              "identical": not problems, "differences": problems[:50], "baseline": base, "this": new}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "same_losses.json").write_text(json.dumps(result, indent=1))
    last = new["records"][-1] if new["records"] else {}
    print(f"{len(new['records'])} steps, last loss {last.get('loss')}: "
          + ("identical to the baseline in every step" if not problems else f"{len(problems)} difference(s):"))
    for line in problems[:20]:
        print("  " + line)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
