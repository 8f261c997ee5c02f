"""Three sizes of the tiny hybrid on the same tokens, evaluated and compared: the scaling workflow end to end.

    python benchmarks/size_sweep.py [--hidden 256,384,512] [--work DIR] [--out-dir DIR] [--timeout-s S]

Trains ``configs/tiny.yaml`` once per hidden size (FFN 3x hidden, Mamba heads and attention head size
following the hidden size; everything else, the data and the token count included, unchanged), all at
the same time on one GPU (the tiny models leave it mostly idle). Then, per run and again all at once,
``hybrid-megatron eval``
on the final checkpoint with ``ppl,length,lm-eval`` (the local tasks in ``tests/fixtures/lm_eval``), and
``hybrid-megatron compare`` over the runs: loss curves, the L(N) fit with its bootstrap interval, red flags.
Writes ``size_sweep.json`` (device, versions, commands, per-run numbers, the fit) and copies the PNGs and
reports beside it; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.devtools.gpu_launch import device_name, launch
from hybrid_megatron.training.environment import versions

CONFIG = "configs/tiny.yaml"
TASKS = ("python_next_line", "python_bpb")


def size_overrides(hidden: int) -> list[str]:
    return [f"model.hidden_size={hidden}", f"model.ffn_hidden_size={3 * hidden}"]


def train(hidden: int, work: Path, timeout: float) -> dict:
    run_dir = work / f"h{hidden}"
    cmd = ["-m", "hybrid_megatron", "pretrain", CONFIG, *size_overrides(hidden), f"logging.run_dir={run_dir}",
           "logging.tensorboard=false", "checkpoint.save_interval=null"]
    start = time.perf_counter()
    code, tail = launch(1, cmd, timeout, work / f"h{hidden}.train.log",
                        progress=lambda t: print(f"h{hidden}: training, {t:.0f} s", flush=True), every_s=60)
    return {"hidden": hidden, "run_dir": str(run_dir), "train_command": " ".join(["python", *cmd]), "train_exit": code,
            "train_seconds": round(time.perf_counter() - start, 1), **({"train_tail": tail} if code else {})}


def lm_eval_problem(hidden: int) -> str | None:
    """Why lm-eval cannot run on this size's exported model on a GPU (transformers' conv path), or None."""
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.convert.checks import hf_cuda_conv_problem

    return hf_cuda_conv_problem(load_run_config(ROOT / CONFIG, size_overrides(hidden)).model)


def evaluate(run: dict, work: Path, timeout: float) -> dict:
    problem = lm_eval_problem(run["hidden"])
    lm_eval = [] if problem else ["--tasks", ",".join(TASKS), "--task-dir", str(ROOT / "tests" / "fixtures" / "lm_eval")]
    cmd = ["-m", "hybrid_megatron", "eval", str(Path(run["run_dir"]) / "checkpoints"),
           "--suite", "ppl,length" if problem else "ppl,length,lm-eval", *lm_eval, "--no-progress"]
    start = time.perf_counter()
    code, tail = launch(1, cmd, timeout, work / f"h{run['hidden']}.eval.log")
    found = sorted(Path(run["run_dir"]).glob("eval/step-*/results.json"))
    out = {"eval_command": " ".join(["python", *cmd]), "eval_exit": code, "lm_eval_skipped": problem,
           "eval_seconds": round(time.perf_counter() - start, 1), **({"eval_tail": tail} if code else {})}
    if found:
        out["eval"] = json.loads(found[-1].read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="256,384,512")
    ap.add_argument("--work", type=Path, default=Path("/tmp/size_sweep"))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "size_sweep")
    ap.add_argument("--timeout-s", type=float, default=420.0, help="per training run (they run at once)")
    args = ap.parse_args(argv)
    hidden = [int(h) for h in args.hidden.split(",")]
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from data_pipeline.sample_data import ensure_sample_data

    ensure_sample_data(progress=False)  # once, before the runs start together
    with ThreadPoolExecutor(len(hidden)) as pool:
        runs = list(pool.map(lambda h: train(h, args.work, args.timeout_s), hidden))
    done = [r for r in runs if r["train_exit"] == 0]
    with ThreadPoolExecutor(max(1, len(done))) as pool:  # evaluations at the same time too
        for run, evaluated in zip(done, pool.map(lambda r: evaluate(r, args.work, 300.0), done)):
            run.update(evaluated)
    compare_cmd = ["-m", "hybrid_megatron", "compare", *(r["run_dir"] for r in done), "--out", str(args.out_dir / "compare")]
    code, tail = launch(1, compare_cmd, 300.0, args.work / "compare.log")
    summary_path = args.out_dir / "compare" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    for run in done:
        name = f"h{run['hidden']}"
        for f in sorted(Path(run["run_dir"]).glob("eval/step-*/*")):
            if f.suffix in (".png", ".md", ".json"):
                (args.out_dir / name).mkdir(exist_ok=True)
                shutil.copy(f, args.out_dir / name / f.name)
    result = {"benchmark": "size_sweep", "command": " ".join(["python", *sys.argv]), "device": device_name(),
              "versions": versions(), "config": CONFIG, "hidden_sizes": hidden, "runs": runs,
              "compare_command": " ".join(["python", *compare_cmd]), "compare_exit": code, "compare": summary,
              **({"compare_tail": tail} if code else {})}
    (args.out_dir / "size_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'run':<6}{'params':>12}{'train s':>9}{'val loss':>10}{'8x loss':>9}{'next_line acc':>15}{'bpb':>8}")
    by_name = {r["name"]: r for r in (summary or {}).get("runs", [])}
    for run in runs:
        name = f"h{run['hidden']}"
        row = by_name.get(name, {})
        head = row.get("eval", {})
        print(f"{name:<6}{row.get('params', 0):>12,}{run['train_seconds']:>9.0f}"
              f"{head.get('ppl/loss', float('nan')):>10.4f}{head.get('length/8x/loss', float('nan')):>9.4f}"
              f"{head.get('lm-eval/python_next_line/acc', float('nan')):>15.3f}"
              f"{head.get('lm-eval/python_bpb/bits_per_byte', float('nan')):>8.3f}")
    for fam in (summary or {}).get("families", []):  # one family: the sweep changes the width only
        fit = fam["scaling_fit"]
        if fit:
            print(f"L(N) = {fit['E']:.4f} + {fit['A']:.4g} N^-{fit['alpha']:.4f}, alpha 95% interval {fit['alpha_ci']}")
        for flag in fam["red_flags"]:
            print(f"red flag: {flag}")
    return 0 if len(done) == len(runs) and all(r.get("eval_exit") == 0 for r in done) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
