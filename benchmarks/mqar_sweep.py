"""MQAR for attention-only, Mamba-2-only and hybrid models of matched size, trained on the same items, then
the ``mqar`` and ``state`` suites on each: the recall diagnostics end to end.

    python benchmarks/mqar_sweep.py [--docs 64000] [--work DIR] [--out-dir DIR] [--timeout-s S]
                                    [--archs attention,mamba,hybrid] [--resume]

Writes the MQAR sources (``prepare-data --synthetic mqar``, training seed 0, validation seed 1), trains
``configs/mqar/{attention,mamba,hybrid}.yaml`` at the same time on one GPU, evaluates each final checkpoint
with ``eval --suite mqar,state`` (512 unseen items per cell) and ``compare`` over the three. Writes
``mqar_sweep.json`` (device, versions, commands, a row per model: validation losses, accuracy by pairs, the state
suite's cuts) with each model's reports, plots and ``val.jsonl`` beside it;
prints accuracy by pairs and the reliance scores last. Each model's report and plots land in ``--out-dir`` as
soon as its evaluation ends. ``--resume`` keeps ``--work``: the data is not written again and each training
continues from its last checkpoint (``pretrain`` resumes from ``latest``), so a sweep cut off by a time limit
finishes in later calls, one model at a time with ``--archs`` if need be.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipeline.shards import INDEX_NAME
from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.devtools.gpu_launch import device_name, launch
from hybrid_megatron.eval.compare import read_jsonl
from hybrid_megatron.eval.report import cut_p_value
from hybrid_megatron.training.environment import versions

ARCHS = ("attention", "mamba", "hybrid")


def _run(name: str, argv: list[str], work: Path, timeout: float) -> dict:
    start = time.perf_counter()
    code, tail = launch(1, ["-m", "hybrid_megatron", *argv], timeout, work / f"{name}.log",
                        progress=lambda t: print(f"{name}: {t:.0f} s", flush=True), every_s=60)
    return {f"{name}_command": " ".join(["hybrid-megatron", *argv]), f"{name}_exit": code,
            f"{name}_seconds": round(time.perf_counter() - start, 1), **({f"{name}_tail": tail} if code else {})}


def arch(name: str, data: Path, work: Path, timeout: float, out_dir: Path) -> dict:
    run_dir = work / name
    overrides = [f"data.sources.mqar={data / 'train'}", f"data.validation.sources.mqar_val={data / 'val'}",
                 f"logging.run_dir={run_dir}", "logging.tensorboard=false"]
    out = {"arch": name, "run_dir": str(run_dir),
           **_run(f"{name}-train", ["pretrain", f"configs/mqar/{name}.yaml", *overrides], work, timeout)}
    if out[f"{name}-train_exit"] == 0:
        out.update(_run(f"{name}-eval", ["eval", str(run_dir / "checkpoints"), "--suite", "mqar,state",
                                         "--no-progress"], work, timeout))
        found = sorted(run_dir.glob("eval/step-*/results.json"))
        if found:
            out["eval"] = json.loads(found[-1].read_text())
            (out_dir / name).mkdir(exist_ok=True)
            for f in sorted(found[-1].parent.iterdir()):
                shutil.copy(f, out_dir / name / f.name)
    return out


def summary(ev: dict, val_loss: dict[int, float], trained_steps: int) -> dict:
    """One model's row of the recorded sweep, from its ``eval`` results (``results.json``) and its validation
    losses by step: accuracy by pairs, and the state suite's cells without their per-item outcomes (those stay in
    the model's ``results.json``)."""
    return {"evaluated_step": ev["step"], "trained_steps": trained_steps, "params": ev["params"],
            "pattern": ev["pattern"],
            "validation_loss_by_step": {str(s): round(v, 4) for s, v in sorted(val_loss.items())},
            "mqar_accuracy_by_pairs": {str(c["pairs"]): round(c["accuracy"], 4)
                                       for c in ev["suites"]["mqar"]["cells"]},
            "state": [{k: v for k, v in c.items() if k not in ("outcomes", "items_fingerprint")}
                      for c in ev["suites"]["state"]["cells"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=64000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mqar_sweep"))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "mqar_sweep")
    ap.add_argument("--timeout-s", type=float, default=480.0, help="per training run and per evaluation")
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    ap.add_argument("--resume", action="store_true", help="keep --work: reuse its data, continue its trainings")
    args = ap.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs or set(archs) - set(ARCHS):
        ap.error(f"--archs {args.archs!r}: choose from {', '.join(ARCHS)}")
    if args.work.exists() and not args.resume:
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    for split, seed, docs in (("train", 0, args.docs), ("val", 1, 2048)):
        if (data / split / INDEX_NAME).is_file():  # written last: the source is complete
            continue
        code, tail = launch(1, ["-m", "hybrid_megatron", "prepare-data", "--synthetic", "mqar", "--docs", str(docs),
                                "--seed", str(seed), "--output", str(data / split), "--no-progress"], 600.0,
                            args.work / f"data-{split}.log")
        if code:
            print(f"prepare-data {split} failed:\n{tail}")
            return 1
    with ThreadPoolExecutor(len(archs)) as pool:
        runs = list(pool.map(lambda a: arch(a, data, args.work, args.timeout_s, args.out_dir), archs))
    done = [r for r in runs if "eval" in r]
    code, tail = launch(1, ["-m", "hybrid_megatron", "compare", *(r["run_dir"] for r in done), "--out",
                            str(args.out_dir / "compare")], 300.0, args.work / "compare.log")
    rows = {}
    for r in done:
        val = read_jsonl(Path(r["run_dir"]) / "val.jsonl")
        if val:
            shutil.copy(Path(r["run_dir"]) / "val.jsonl", args.out_dir / r["arch"] / "val.jsonl")
        steps = read_jsonl(Path(r["run_dir"]) / "losses.jsonl")
        rows[r["arch"]] = summary(r["eval"], {v["step"]: v["loss"] for v in val}, steps[-1]["step"] if steps else 0)
    result = {"benchmark": "mqar_sweep", "command": " ".join(["python", *sys.argv]), "device": device_name(),
              "versions": versions(), "docs": args.docs, "runs": rows,
              "launches": [{k: v for k, v in r.items() if k != "eval"} for r in runs], "compare_exit": code,
              **({"compare_tail": tail} if code else {})}
    (args.out_dir / "mqar_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    for r in done:
        mqar = r["eval"]["suites"]["mqar"]["cells"]
        print(f"{r['arch']:<10} accuracy by pairs: " + ", ".join(f"{c['pairs']}: {c['accuracy']:.3f}" for c in mqar))
        for c in r["eval"]["suites"]["state"]["cells"]:
            cuts = [f"{cut} reliance {c[cut]['reliance']:.3f} (p {cut_p_value(c[cut])})"
                    for cut in ("ssm_cut", "attention_cut") if isinstance(c[cut], dict) and c[cut]["reliance"] is not None]
            print(f"{'':<10} {c['pairs']} pairs: full {c['accuracy']['full']:.3f}; " + "; ".join(cuts))
    return 0 if len(done) == len(archs) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
