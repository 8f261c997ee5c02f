"""What validation in the loop costs: the same run with and without it, side by side on one GPU.

    python benchmarks/validation_overhead.py [--config configs/tiny.yaml] [--steps 300] [--out F]

Runs ``pretrain CONFIG train.train_steps=N`` twice at the same time (the tiny model leaves the GPU mostly
idle, so both see the same conditions): once as configured (``train.eval_interval`` and
``data.validation`` from the config), once with ``data.validation=null train.eval_interval=null``. Reports
the wall time from the first to the last step of each, the time the evaluations took (``val.jsonl``) and
the overhead: (with - without) / without, and evaluation seconds / training seconds of the run with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hybrid_megatron.training.environment import versions
from hybrid_megatron.devtools.gpu_launch import device_name, launch


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run(name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    run_dir = args.work / name
    overrides = [f"logging.run_dir={run_dir}", f"train.train_steps={args.steps}", "checkpoint.save_final=false",
                 "checkpoint.save_interval=null", "logging.tensorboard=false", *extra]
    code, tail = launch(1, ["-m", "hybrid_megatron", "pretrain", args.config, *overrides], args.timeout_s,
                        args.work / f"{name}.log")
    steps, evals = _records(run_dir / "losses.jsonl"), _records(run_dir / "val.jsonl")
    seconds = steps[-1]["time"] - steps[0]["time"] if len(steps) > 1 else None
    return {"exit": code, "steps": len(steps), "seconds_first_to_last_step": seconds,
            "evaluations": evals, "evaluation_seconds": sum(e["seconds"] for e in evals),
            **({"tail": tail} if code else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--timeout-s", type=float, default=540.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/validation_overhead"))
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        with_f = pool.submit(run, "with_validation", args, [])
        without_f = pool.submit(run, "without_validation", args, ["data.validation=null", "train.eval_interval=null"])
        with_v, without = with_f.result(), without_f.result()
    result = {"benchmark": "validation_overhead", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "device": device_name(), "versions": versions(), "config": args.config, "steps": args.steps,
              "with_validation": with_v, "without_validation": without}
    ok = not with_v["exit"] and not without["exit"] and with_v["seconds_first_to_last_step"] and \
        without["seconds_first_to_last_step"]
    if ok:
        t_with, t_without = with_v["seconds_first_to_last_step"], without["seconds_first_to_last_step"]
        result["overhead_wall"] = (t_with - t_without) / t_without
        result["overhead_eval_share"] = with_v["evaluation_seconds"] / t_with
        print(f"{'run':<22}{'steps':>7}{'seconds':>10}{'evals':>7}{'eval s':>8}")
        for name, r in (("with validation", with_v), ("without validation", without)):
            print(f"{name:<22}{r['steps']:>7}{r['seconds_first_to_last_step']:>10.1f}{len(r['evaluations']):>7}"
                  f"{r['evaluation_seconds']:>8.2f}")
        print(f"overhead: {result['overhead_wall']:+.2%} wall, evaluations {result['overhead_eval_share']:.2%} of "
              "the run's time")
        last = with_v["evaluations"][-1] if with_v["evaluations"] else None
        if last:
            print(f"last validation at step {last['step']}: loss {last['loss']:.4f} {last['loss_by_source']}")
    else:
        print("a run failed: " + json.dumps({k: v.get("tail", "")[-800:] for k, v in
                                              (("with", with_v), ("without", without))}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
