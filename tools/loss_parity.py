"""Loss-curve parity of real ``pretrain`` runs: parallel layouts against one GPU, FP8 against BF16.

    python tools/loss_parity.py run parallel [--runs tp1,tp2-sp,...] [--steps 60]   # 2 GPUs (1 for tp1)
    python tools/loss_parity.py run families [--runs gdn-1,gdn-tp2-sp,...]          # 2 GPUs (1 for *-1)
    python tools/loss_parity.py run fp8 [--runs bf16,fp8-tensorwise,...] [--steps 300]   # 1 GPU
    python tools/loss_parity.py run fp8-64k --runs bf16,bf16-repeat --concurrent 2    # 2 GPUs, one run each
    python tools/loss_parity.py run fp8 --runs bf16,fp8-tensorwise --concurrent 2   # side by side
    python tools/loss_parity.py compare parallel OUT/parallel_runs.json [MORE.json ...]  # anywhere
    python tools/loss_parity.py plan parallel                                          # anywhere

Every run is the real CLI (``python -m hybrid_megatron pretrain CONFIG overrides``, under
``torch.distributed.run`` for 2 GPUs) in a child process with a timeout; its ``losses.jsonl`` (one
record per step: loss, tokens, time) goes into ``<out>/<suite>_runs.json``, merged with the runs
already there, so a suite can be spread over several calls and compared later on any machine.

Suites (``plan SUITE`` prints the runs and their command lines):

* ``parallel`` -- configs/tiny.yaml, deterministic kernels, the pattern cut unevenly for PP=2
  (7 + 3 layers). TP=2 with sequence parallel, PP=2, PP=2 with 2 interleaved chunks per rank, DP=2
  (distributed optimizer) and DP=2 with overlapped grad reduce and param gather, all starting from the
  TP=PP=DP=1 run's saved initial weights, follow that run within 1% at every step; selective and full
  recompute at each layout follow that layout's run; the TP=2 checkpoint at the half-way step resumes
  at PP=2 and at TP=1 with the same next-step loss, and the overlapped DP=2 run resumes at its own
  layout within 1e-4 (bitwise expected).
* ``families`` -- the layer families on configs/tiny.yaml with deterministic kernels: a Gated DeltaNet, an MoE
  and a sliding-window hybrid (10 layers each, cut 7 + 3 for PP=2) at TP=2 with sequence parallel, PP=2 and
  DP=2, and the MoE one at EP=2 too, each from its one-GPU run's initial weights and following that run within
  1% at every step (2 GPUs; not run yet).
* ``cp`` -- context parallelism on configs/tiny.yaml: CP=2 with megatron's all-to-all Mamba context parallelism
  and with state passing (model/ssm_state_passing.py), on rows of one document and on packed documents padded to
  a multiple of 16 (data.document_multiple) and split one document at a time. Each from its CP=1 run's initial
  weights and following it within 1% at every step (2 GPUs; pretrain refuses CP > 1 until these have passed).
* ``fp8`` -- configs/1b.yaml at 16k tokens per step (4 x 4096, ~3 min a run on an H100): FP8 recipes
  (tensorwise, tensorwise with the first/last 2 layers in BF16, delayed, tensorwise with the Mamba
  in/out projections in BF16, and both BF16 measures together) follow BF16 within 1.5% at every step
  after warm-up, comparing the logged losses (means over each 10-step log interval, as the console and
  Megatron-LM log them; the ``max rel diff`` column), the per-step maximum kept in the JSON.
  ``bf16-repeat`` runs BF16 again: its kernels are not bitwise reproducible, so its row
  is the run-to-run spread of this config that the FP8 rows are read against: each FP8 row says
  whether its largest distance lies within the repeat's (the verdicts stay the 1.5% bar's). The
  ``over tol`` column counts the logged steps past the bar; the ``mean diff`` column, signed,
  separates a drift from step-to-step noise.
* ``fp8-64k`` -- the same runs at 64k tokens a step (16 x 4096, micro-batches of 4; 280-370 s a run on an H200):
  at 16k tokens BF16 strays up to 4.8% from its own repeat at a logged step, so the 1.5% bar needs
  less noise a step to judge an FP8 recipe by.
* ``7b-layers`` -- configs/pretrain_7b.yaml's layer sizes and FP8 recipe at 4 layers (``M-*-``) on one
  GPU and the sample data: FP8 against BF16, and tokens/s of each (the tok/s column).

``--concurrent N`` runs N independent one-GPU runs at a time, spread over the visible GPUs (several
per GPU when there are fewer GPUs than N: the small-batch 1B runs leave the GPU partly idle, and their
losses do not depend on what else runs). Before starting, the dry-run memory estimate of every selected
run (10 GB of per-process overhead included) times the runs that would share a GPU must fit that GPU's
memory: a configs/1b.yaml run at 16k tokens a step needs ~43 GB (BF16) to ~45 GB (FP8), so two do not fit
an H100 (measured: the second run ran out of memory) and three fit an H200.
Suites that compare tokens/s refuse it, as do multi-GPU runs and runs that start from another selected
run.

A run passes when it has every step it should, saw the same tokens per step as its reference (the
same data), and its loss stays within the tolerance. ``<out>/<suite>_parity.json`` holds the table.
Exit 0 when every compared run passes, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.training.environment import versions
from hybrid_megatron.devtools.gpu_launch import device_name, gpu_memory_bytes, launch, launch_command, visible_gpus
from hybrid_megatron.devtools.parity_compare import compare_suite, format_table, merge_results
from hybrid_megatron.devtools.parity_suites import SUITES, Run, Suite, expected_steps, needed_later, run_overrides


# ---- running (GPU machine) ---------------------------------------------------------------------------


def launch_env(suite: Suite) -> dict[str, str]:
    """Cached Triton autotuning: the runs of a suite share shapes, so only the first searches Mamba's tile
    configs (~2 min on a cold machine). Deterministic suites are left alone: there mamba-ssm fixes one
    config per kernel unless autotuning is cached, and the fixed config compiles fastest."""
    return {} if "train.deterministic=true" in suite.common else {"TRITON_CACHE_AUTOTUNING": "1"}


def execute(suite: Suite, run: Run, steps: int, work: Path, timeout: float, results: dict[str, dict],
            gpu: int | None = None) -> dict:
    run_dir = work / run.name
    source = run.resume_from or run.init_from
    if source and results.get(source, {}).get("status") != "ok":
        return {"status": "skipped", "error": f"needs a finished {source} run first"}
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["-m", "hybrid_megatron", "pretrain", suite.config, *run_overrides(suite, run, steps, work)]
    start = time.perf_counter()
    losses_file = run_dir / "losses.jsonl"
    want = len(expected_steps(run, steps))

    def progress(elapsed: float) -> None:
        done = len(losses_file.read_text().splitlines()) if losses_file.is_file() else 0
        eta = f", ETA {elapsed / done * (want - done):.0f} s" if done else " (starting)"
        print(f"[{run.name}] {done}/{want} steps after {elapsed:.0f} s{eta}", flush=True)

    env = launch_env(suite) if gpu is None else {**launch_env(suite), "CUDA_VISIBLE_DEVICES": str(gpu)}
    code, tail = launch(run.gpus, argv, timeout, work / f"{run.name}.log", progress=progress, env=env)
    losses = [json.loads(x) for x in losses_file.read_text().splitlines()] if losses_file.is_file() else []
    row = {"status": "ok" if code == 0 else "failed", "exit": code, "seconds": round(time.perf_counter() - start, 1),
           "gpus": run.gpus, "overrides": list(run.overrides), "losses": losses}
    if code != 0:
        row["log_tail"] = tail[-2000:]
    if not needed_later(suite, run):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 1B checkpoints would fill the disk
    return row


def memory_problem(suite: Suite, runs: list[Run], steps: int, work: Path, concurrent: int, gpus: int,
                   gpu_bytes: int) -> str | None:
    """Why ``concurrent`` runs do not fit the GPUs (dry-run estimates, world size 1), or None."""
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.training.dry_run import peak_memory_bytes

    per_gpu = -(-concurrent // max(gpus, 1))
    if per_gpu < 2 or gpu_bytes <= 0:
        return None
    need = {r.name: peak_memory_bytes(load_run_config(ROOT / suite.config, run_overrides(suite, r, steps, work)),
                                      world_size=1) for r in runs}
    worst = max(need, key=need.__getitem__)
    if per_gpu * need[worst] <= gpu_bytes:
        return None
    fits = max(1, gpus * int(gpu_bytes // need[worst]))
    return (f"--concurrent {concurrent}: {per_gpu} runs would share a {gpu_bytes / 1e9:.0f} GB GPU and run {worst} "
            f"alone needs ~{need[worst] / 1e9:.0f} GB (dry-run estimate, per-process overhead included); "
            f"use --concurrent {fits}")


def cmd_run(args: argparse.Namespace, suite: Suite) -> int:
    work, out = Path(args.work) / suite.name, Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = work / "runs.json"
    previous = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    results = previous.get("runs", {}) if previous.get("steps") == args.steps else {}
    gpus = visible_gpus()
    if args.concurrent > 1:
        problem = memory_problem(suite, args.selected, args.steps, work, args.concurrent, gpus, gpu_memory_bytes())
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    record = {"suite": suite.name, "config": suite.config, "common": list(suite.common), "steps": args.steps,
              "device": device_name(), "gpus": gpus, "versions": _versions(), "runs": results}
    started = time.perf_counter()
    lock = threading.Lock()
    free_gpus = [k % max(gpus, 1) for k in range(args.concurrent)]  # one entry per slot: slot k on GPU k mod visible

    def one(run: Run) -> None:
        left = args.budget_s - (time.perf_counter() - started)
        if run.gpus > gpus:
            row = {"status": "skipped", "error": f"needs {run.gpus} GPUs, {gpus} visible"}
        elif left < 30:
            row = {"status": "skipped", "error": f"--budget-s {args.budget_s} spent"}
        elif args.concurrent == 1:
            row = execute(suite, run, args.steps, work, min(args.timeout_s, left), results)
        else:
            with lock:
                gpu = free_gpus.pop(0)
            try:
                row = execute(suite, run, args.steps, work, min(args.timeout_s, left), results, gpu=gpu)
            finally:
                with lock:
                    free_gpus.append(gpu)
            row.update(concurrent=args.concurrent, gpu=gpu)
        with lock:
            results[run.name] = row
            print(f"[{run.name}] {row['status']} exit={row.get('exit', '-')} {row.get('seconds', 0)} s "
                  f"{len(row.get('losses', []))} steps {row.get('error', '')}", flush=True)
            for path in (runs_file, out / f"{suite.name}_runs.json"):
                path.write_text(json.dumps(record, indent=None) + "\n")

    if args.concurrent == 1:
        for run in args.selected:
            one(run)
    else:
        with ThreadPoolExecutor(max_workers=args.concurrent) as pool:
            list(pool.map(one, args.selected))  # list(): re-raises a worker's exception here
    return report(suite, args.steps, results, out)


def report(suite: Suite, steps: int, results: dict[str, dict], out: Path | None) -> int:
    rows = compare_suite(suite, steps, results)
    print(format_table(rows))
    if out is not None:
        (out / f"{suite.name}_parity.json").write_text(json.dumps({"suite": suite.name, "steps": steps,
                                                                   "rows": rows}, indent=1) + "\n")
    ran = [r for r in rows if r["verdict"] not in ("not run",)]
    return 0 if ran and all(r["verdict"] in ("pass", "baseline") for r in ran) else 1


def _versions() -> dict:
    return versions()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="launch the suite's runs (GPU machine), then compare")
    plan = sub.add_parser("plan", help="print the runs and their command lines")
    comp = sub.add_parser("compare", help="compare runs recorded in <suite>_runs.json files")
    for p in (run, plan, comp):
        p.add_argument("suite", choices=sorted(SUITES))
    comp.add_argument("files", nargs="+", type=Path)
    comp.add_argument("--out", default=None, help="write <suite>_parity.json here")
    for p in (run, plan):
        p.add_argument("--runs", default=None, help="comma list of run names (default: all, in suite order)")
        p.add_argument("--steps", type=int, default=None, help="training steps per full run")
        p.add_argument("--work", default="/tmp/loss_parity", help="run directories and logs")
    run.add_argument("--out", default=str(ROOT / "gpu_out"), help="results JSON directory")
    run.add_argument("--timeout-s", type=float, default=None,
                     help="per run (default: the suite's: " + ", ".join(
                         f"{n} {s.run_timeout_s:g} s" for n, s in sorted(SUITES.items())) + ")")
    run.add_argument("--budget-s", type=float, default=540.0, help="start no run after this many seconds")
    run.add_argument("--concurrent", type=int, default=1,
                     help="independent runs at a time, spread over the visible GPUs (default 1)")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    if args.verb in ("run", "plan"):
        args.steps = args.steps or suite.default_steps
        if args.steps < 4:
            ap.error("--steps must be >= 4")
        names = [n.strip() for n in (args.runs or "").split(",") if n.strip()] or [r.name for r in suite.runs]
        known = {r.name: r for r in suite.runs}
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"--runs: unknown {unknown} (suite {suite.name} has {', '.join(known)})")
        args.selected = [r for r in suite.runs if r.name in names]
    if args.verb == "run":
        args.timeout_s = suite.run_timeout_s if args.timeout_s is None else args.timeout_s
        if args.timeout_s <= 0:
            ap.error(f"--timeout-s {args.timeout_s:g}: must be > 0")
    if args.verb == "run" and args.concurrent != 1:
        if args.concurrent < 1:
            ap.error(f"--concurrent {args.concurrent}: must be >= 1")
        if suite.measures_speed:
            ap.error(f"--concurrent: suite {suite.name} compares tokens/s; its runs must not share a GPU")
        wide = [r.name for r in args.selected if r.gpus > 1]
        if wide:
            ap.error(f"--concurrent: {', '.join(wide)} use several GPUs; run them without --concurrent")
        selected = {r.name for r in args.selected}
        for r in args.selected:
            source = r.resume_from or r.init_from
            if source in selected:
                ap.error(f"--concurrent: run {r.name} starts from run {source}; run {source} first, in its own call")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suite = SUITES[args.suite]
    if args.verb == "plan":
        for run in args.selected:
            argv_ = ["-m", "hybrid_megatron", "pretrain", suite.config,
                     *run_overrides(suite, run, args.steps, Path(args.work) / suite.name)]
            span = expected_steps(run, args.steps)
            print(json.dumps({**asdict(run), "steps": [span[0], span[-1]], "command": launch_command(run.gpus, argv_)}))
        return 0
    if args.verb == "compare":
        steps, results = merge_results(args.files)
        out = Path(args.out) if args.out else None
        if out:
            out.mkdir(parents=True, exist_ok=True)
        return report(suite, steps, results, out)
    return cmd_run(args, suite)


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()  # inside the try: a reader that left (`plan fp8 | head`) shows up here
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 1
    sys.exit(code)
