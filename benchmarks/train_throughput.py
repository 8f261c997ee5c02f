"""Training throughput on one GPU: our pretrain step beside megatron-core's stock HybridModel, BF16 and FP8.

    python benchmarks/train_throughput.py                      # 8 default cases, ~6 min on an H100
    python benchmarks/train_throughput.py --cases fp8_7b       # FP8 vs BF16 at 7B layer widths
    python benchmarks/train_throughput.py --scaling            # seq 2048..16384, hybrid vs attention
    python benchmarks/train_throughput.py --cases hybrid1b-bf16-ours --steps 5 --profile
    python benchmarks/train_throughput.py --cases hybrid1b-bf16-ours,hybrid1b-bf16-stock --repeats 3
    python benchmarks/train_throughput.py --cases hybrid1b-bf16-ours,hybrid1b-bf16-stock --packed 1024

Cases are MODEL-PRECISION-PATH (``--list`` prints them). ``ours``: our layer specs
(``hybrid_megatron.model.build``), our bf16 wrap with fp32 A_log/D/dt_bias, megatron DDP + distributed
optimizer with our param groups, and our ``train_step``. ``stock``: megatron-core's ``HybridModel`` with
its TE spec (``hybrid_layer_specs.hybrid_stack_spec``), ``Float16Module``, the same DDP/optimizer
settings with megatron's default param groups, and a minimal loop on ``get_forward_backward_func``.
Both get the same TransformerConfig (sizes, FP8 recipe), the same synthetic batches, micro-batches and
warm-up; warm-up steps are not timed. FP8 is ``hybrid`` format with ``tensorwise`` (current) scaling.

The two paths live in ``hybrid_megatron/devtools/throughput_paths.py``. Each case runs in a fresh process (``--in-process`` runs them in this one, faster). ``case_peak_gib``, the
"mem GiB" column, is the peak above what was allocated when the case began (``resident_at_start_gib``, which
should be ~0: runs before this field existed kept the previous case's model alive through a loop variable,
about 10 bytes per parameter; reproduced with a CPU stand-in). The JSON in ``benchmarks/results/`` is rewritten
after every case, so a time-out keeps the finished ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hybrid_megatron.devtools.bench as C
from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.devtools.gpu_launch import kill_session
from hybrid_megatron.devtools.throughput_paths import build_ours, build_stock, synthetic_batches
from hybrid_megatron.training.environment import device_name, versions

RESULTS = REPO_ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="default", help="comma list of MODEL-PRECISION-PATH or a preset "
                    f"({', '.join(sorted(C.PRESETS))}); default: {','.join(C.DEFAULT_CASES)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 15; 8 with --scaling)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 3 with --scaling)")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length of the --cases runs")
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8,
                    help="sequences per optimizer step (4 micro-batches by default, so the optimizer step weighs "
                         "about as little as in real runs)")
    ap.add_argument("--fp8-bf16-ends", type=int, default=0,
                    help="pattern layers kept BF16 at each end in FP8 cases (Nemotron-H used 2)")
    ap.add_argument("--scaling", action="store_true",
                    help="ours, bf16: tokens/s and memory at seq 2048/4096/8192/16384, hybrid1b vs attn1b")
    ap.add_argument("--scaling-seqs", default=",".join(map(str, C.SCALING_SEQS)))
    ap.add_argument("--step-tokens", type=int, default=32768, help="--scaling: tokens per optimizer step")
    ap.add_argument("--micro-tokens", type=int, default=16384, help="--scaling: tokens per micro-batch")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every case this many times, in rounds (each case once per round, so ours and stock "
                         "alternate); the table and ratios use each case's median run")
    ap.add_argument("--packed", type=int, default=0, metavar="DOC_TOKENS",
                    help="documents of ~DOC_TOKENS tokens (geometric lengths) packed into the rows, each micro-batch "
                         "flattened into megatron's thd layout with cu_seqlens and seq_idx, as pretrain trains; "
                         "default 0: unpacked rows")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override for our path (for example model.mamba_chunk_size=256); repeatable. "
                         "Refused with stock cases, whose spec takes no such settings; the case names carry it")
    ap.add_argument("--profile", action="store_true", help="profile one extra step: kernel time by category")
    ap.add_argument("--in-process", action="store_true", help="run every case in this process")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="stop starting cases once this much wall time has passed (the JSON keeps what ran)")
    ap.add_argument("--case-timeout-s", type=float, default=420.0,
                    help="per case; the first case of a model also compiles and autotunes its kernels")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/train_throughput[_scaling].json)")
    ap.add_argument("--list", action="store_true", help="print the case names and model sizes, then exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case spec (JSON) and exit
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.scaling else 15
    if args.warmup is None:
        args.warmup = 3 if args.scaling else 5
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    if args.packed < 0 or args.packed == 1:
        ap.error(f"--packed {args.packed}: documents need at least 2 tokens (0 turns packing off)")
    if args.out is None:
        args.out = str(RESULTS / ("train_throughput_scaling.json" if args.scaling else "train_throughput.json"))
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """Case specs (plain dicts, passed to the worker process as JSON)."""
    tag = (f"[{','.join(args.set)}]" if args.set else "") + (f"-packed{args.packed}" if args.packed else "")
    if args.scaling:
        specs = []
        for seq in (int(s) for s in args.scaling_seqs.split(",")):
            mbs, global_batch = max(1, args.micro_tokens // seq), args.step_tokens // seq
            if args.step_tokens % seq or global_batch < 1 or global_batch % mbs:
                raise ValueError(f"--scaling: seq {seq} must divide --step-tokens {args.step_tokens} into a "
                                 f"multiple of {mbs} sequences (--micro-tokens {args.micro_tokens})")
            for model in C.SCALING_MODELS:
                specs.append({"name": f"{model}-bf16-ours-seq{seq}{tag}", "model": model, "precision": "bf16",
                              "path": "ours", "seq_len": seq, "micro_batch_size": mbs, "global_batch": global_batch,
                              "overrides": list(args.set)})
        return specs
    cases = C.parse_cases(args.cases, args.seq)
    stock = [c.name for c in cases if c.path == "stock"]
    if args.set and stock:
        raise ValueError(f"--set changes our path only, and megatron's stock spec takes no such settings: drop "
                         f"{', '.join(stock)} or the --set options")
    return [{"name": c.name + tag, "model": c.model, "precision": c.precision, "path": c.path, "seq_len": args.seq,
             "micro_batch_size": args.micro_batch_size, "global_batch": args.global_batch,
             "overrides": list(args.set)}
            for c in cases]


def spec_config(spec: dict, args: argparse.Namespace):
    return C.run_config(spec["model"], spec["precision"], spec["seq_len"], spec["micro_batch_size"],
                        spec["global_batch"], fp8_bf16_ends=args.fp8_bf16_ends,
                        overrides=tuple(spec.get("overrides", ())), packed=bool(args.packed))


# ---------------------------------------------------------------------------------------------------
# one case (GPU)


def profile_step(step_fn, batch) -> dict:
    """CUDA kernel time of one step, by category (see ``devtools.bench.kernel_category``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn(batch)
        torch.cuda.synchronize()
    return C.summarize_kernels(C.device_kernel_times(prof.key_averages()))


def run_case(spec: dict, args: argparse.Namespace, gemm_tflops: float | None) -> dict:
    import torch

    cfg = spec_config(spec, args)
    seq_len = spec["seq_len"]
    numbers = C.model_numbers(cfg, seq_len)
    row = {**spec, **numbers, "warmup_steps": args.warmup, "timed_steps": args.steps,
           "tokens_per_step": spec["global_batch"] * seq_len}
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()  # > 0 when earlier cases of this process left memory behind
    t0 = time.perf_counter()
    build = build_ours if spec["path"] == "ours" else build_stock
    model, optimizer, step_fn = build(cfg, seq_len)
    row["built_params"] = sum(p.numel() for m in model for p in m.parameters())
    row["build_s"] = time.perf_counter() - t0
    batches = synthetic_batches(2, spec["global_batch"], seq_len, cfg.model.vocab_size, doc_tokens=args.packed)
    for chunk in model:
        chunk.train()
    del chunk  # a loop variable left alive keeps the whole model (buffers, main params) past the case
    losses = [step_fn(batches[i % 2]) for i in range(args.warmup)]
    torch.cuda.synchronize()
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        losses.append(step_fn(batches[i % 2]))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sum(times)
    row.update(C.rates(row["tokens_per_step"] * args.steps, seconds, numbers["flops_per_token"], device_name(),
                       gemm_tflops=gemm_tflops))
    row.update(C.peak_memory_gib(resident))
    row.update(step_s_median=sorted(times)[len(times) // 2], step_s_min=min(times), step_s_max=max(times),
               loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
               losses_finite=all(x == x and abs(x) != float("inf") for x in losses))
    if args.profile:
        prof = profile_step(step_fn, batches[0])
        # kernel time against the unprofiled median step: well under 1 means the GPU waits on the host
        # (kernel launches, syncs); near 1 means the kernels themselves bound the step
        prof["kernel_share_of_median_step"] = prof["kernel_ms_total"] / (1e3 * row["step_s_median"])
        row["profile"] = prof
    del model, optimizer, step_fn, batches
    gc.collect()
    torch.cuda.empty_cache()
    return row


def worker(args: argparse.Namespace) -> int:
    """Runs one case spec in this (fresh) process; writes its row as JSON to --worker-out."""
    spec = json.loads(args.worker)
    out = Path(args.worker_out)
    try:
        C.init_single_gpu()
        gemm = C.measure_gemm_tflops()
        row = {**run_case(spec, args, gemm), "gemm_bf16_tflops": gemm}
    except Exception as exc:  # the parent records the failure and goes on with the next case
        import traceback

        row = {**spec, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    out.write_text(json.dumps(row, default=str))
    return 0 if "error" not in row else 1


# ---------------------------------------------------------------------------------------------------
# driver


# Mamba's Triton kernels autotune over many tile configs on first use of a shape (~2 min for a 1B
# model on a cold machine); cached autotuning lets the later cases of the same shapes skip the search.
CASE_ENV = {"TRITON_CACHE_AUTOTUNING": "1"}


def _run_subprocess(spec: dict, args: argparse.Namespace, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--fp8-bf16-ends", str(args.fp8_bf16_ends),
               "--packed", str(args.packed)]
        if args.profile:
            cmd.append("--profile")
        # its own session, killed whole afterwards: a worker it forked (torch.compile's pool) would keep
        # the GPU memory of a timed-out case and starve the next one
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                env={**os.environ, **CASE_ENV}, start_new_session=True)
        timed_out = False
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_session(proc)
        if timed_out:
            _, stderr = proc.communicate()
            return {**spec, "error": f"timed out after {timeout:.0f} s", "stderr_tail": stderr[-3000:]}
        if out.is_file():
            row = json.loads(out.read_text())
        else:
            row = {**spec, "error": f"worker exited {proc.returncode} without a result"}
        if "error" in row:
            row["stderr_tail"] = stderr[-3000:]
        return row


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':<34}{'params':>8}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'xGEMM':>7}{'mem GiB':>9}{'spread':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<34}  FAILED: {r['error'][:90]}")
            continue
        spread = r.get("tokens_per_s_spread")
        print(f"{r['name']:<34}{r['params'] / 1e9:>7.2f}B{r['tokens_per_s']:>10,.0f}{r['tflops_per_gpu']:>9.1f}"
              f"{C.fmt(r['mfu'] and 100 * r['mfu'], '.1f'):>6}%{C.fmt(r['ratio_to_measured_gemm'], '.2f'):>7}"
              f"{r['case_peak_gib']:>9.1f}{'-' if spread is None else f'{100 * spread:.1f}%':>8}")
    for label, num, den, value in C.ratios(rows):
        print(f"{label:<44}{num:>24} / {den:<24}{value:>7.3f}")
    for r in rows:
        prof = r.get("profile")
        if prof:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["by_category_share"].items() if v >= 0.01)
            print(f"profile {r['name']}: kernels {prof['kernel_ms_total']:.0f} ms = "
                  f"{100 * prof['kernel_share_of_median_step']:.0f}% of the median step; {shares}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        specs = plan(args)
        for spec in specs:  # validate every config on the CPU before the first GPU minute is spent
            spec_config(spec, args)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for spec in specs:
            n = C.model_numbers(spec_config(spec, args), spec["seq_len"])
            print(f"{spec['name']:<34} {n['params'] / 1e9:.3f}B params, {n['flops_per_token'] / 1e9:.2f} GFLOP/token")
        return 0
    settings = {k: getattr(args, k) for k in ("steps", "warmup", "seq", "micro_batch_size", "global_batch",
                                              "fp8_bf16_ends", "scaling", "profile", "in_process", "repeats",
                                              "set", "packed")}
    if args.scaling:
        settings.update(step_tokens=args.step_tokens, micro_tokens=args.micro_tokens, scaling_seqs=args.scaling_seqs)
    result = C.ResultFile(args.out, C.header("train_throughput", sys.argv, settings))
    result.update(device=device_name(), versions=versions(), models={m: C.MODELS[m] for m in
                                                                          sorted({s["model"] for s in specs})})
    start = time.perf_counter()
    gemm = None
    if args.in_process:
        C.init_single_gpu()
        gemm = C.measure_gemm_tflops()
        result.update(gemm_bf16_tflops=gemm)
    rows = []
    for repeat, spec in ((r, s) for r in range(args.repeats) for s in specs):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            row = {**spec, "error": f"skipped: --budget-s {args.budget_s:.0f} used up"}
        elif args.in_process:
            try:
                row = run_case(spec, args, gemm)
            except Exception as exc:
                row = {**spec, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        else:
            row = _run_subprocess(spec, args, min(args.case_timeout_s, left))
        row["repeat"] = repeat
        rows.append(row)
        result.add(row)
        status = row.get("error") or f"{row['tokens_per_s']:,.0f} tok/s, MFU {C.fmt(row['mfu'], '.3f')}"
        print(f"[{time.perf_counter() - start:6.0f}s] {spec['name']} (run {repeat + 1}/{args.repeats}): {status}",
              flush=True)
    summary = C.combine_repeats(rows)
    result.update(summary=summary, wall_s=time.perf_counter() - start,
                  ratios=[{"what": a, "numerator": b, "denominator": c, "ratio": d} for a, b, c, d in C.ratios(summary)])
    print_table(summary)
    print(f"\nresults: {args.out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
