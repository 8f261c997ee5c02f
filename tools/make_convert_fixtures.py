"""Record conversion-parity fixtures on the GPU machine: tiny trained checkpoints + megatron's own logits.

    python tools/make_convert_fixtures.py [--fixtures tp1,tp2,pp2] [--out tests/fixtures/convert]

For each fixture (``tp1``: one GPU; ``tp2``: TP=2 and ``pp2``: PP=2 with an uneven ``|`` split, two GPUs
each; skipped when fewer GPUs are visible) this driver, which never touches CUDA itself:

1. trains a tiny fp32 hybrid (pattern ``M-*|M-M-``: Mamba-2, attention, MLP; chunk 64) for ``--steps``
   steps on the sample data through the real CLI (``python -m hybrid_megatron pretrain configs/tiny.yaml
   <overrides>``, under ``torch.distributed.run`` for two GPUs). Should that fail, it says why and trains
   with the same components in a worker process instead (``trained_by`` in meta.json says which ran);
2. in a worker at the fixture's TP/PP layout: builds a fresh megatron model, loads the trained weights
   (dist_checkpointing, model part only), saves them as a model-only torch_dist checkpoint
   ``<out>/<name>/ckpt/`` (``step-000000`` + ``latest``, ``run_config.yaml`` with the model section,
   ``train_state.json`` = ``{"weights_only": true, "step": 0}``: what ``convert from-hf`` writes), builds
   another fresh model from that checkpoint and records, in eval mode and strict fp32, ``reference.pt``:

       input_ids   LongTensor [2, 150]        two windows of the sample ``docs`` source (150 > 2 chunks of 64)
       logits      float32    [2, 150, 264]   megatron's logits, gathered over TP, padded vocab included
       greedy_ids  LongTensor [2, 70 + 20]    prompt input_ids[:, :70] + 20 greedy tokens by full forwards
                                              (no cache), argmax over the first vocab_size=257 columns
       prompt_len  int                        70

   plus ``meta.json`` (layout, steps, losses, versions). See tests/test_convert_parity.py for the contract.

   Strict fp32 (``reference_precision: "fp32"``): Transformer Engine runs every fp32 GEMM as TF32
   (cuBLASLt ``CUBLAS_COMPUTE_32F_FAST_TF32``, not configurable) and Triton's ``tl.dot`` defaults to TF32
   (the Mamba-2 SSD kernels), which puts ~5e-4 of the logit scale between megatron's "fp32" logits and a
   true fp32 forward. The reference therefore comes from the same checkpoint loaded into megatron's
   local-spec model (its norms map onto the TE keys), with TF32 off in torch and cuDNN,
   ``TRITON_F32_DEFAULT=ieee`` (and a fresh Triton cache, whose key ignores that setting), and SDPA's
   math kernel. The TE model's logits are compared with it and recorded in meta.json
   (``te_tf32_max_abs_diff``). ``--reference te`` records the TE logits instead
   (``reference_precision: "tf32"``).
   The fixture's tensor keys carry no wrapper prefix (as ``convert from-hf`` writes and ``convert to-hf``
   reads), as do training saves (taken below the DDP wrapper); weights load through
   ``checkpoint.live.load_model_weights``, as every model built outside the training loop does.
3. checks each fixture (contract, ``latest``, size) and prints a table; ``--summary`` gets a JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.devtools.fixture_spec import (
    FIXTURES, MAX_FIXTURE_BYTES, TE_REFERENCE, check_fixture, model_fields, nproc, overrides,
)
from hybrid_megatron.devtools.fixture_worker import worker
from hybrid_megatron.devtools.gpu_launch import device_name, launch, visible_gpus


# ---------------------------------------------------------------------------------------------------
# driver (no CUDA here: every GPU step runs in a child process)


def worker_argv(mode: str, name: str, run_dir: Path, steps: int, layout: dict, dest: Path, info: Path,
                 source: Path | None = None, reference: str = "fp32") -> list[str]:
    argv = [str(Path(__file__).resolve()), "--worker", mode, "--fixture", name, "--run-dir", str(run_dir),
            "--steps", str(steps), "--layout", json.dumps(layout), "--dest", str(dest), "--info", str(info),
            "--reference", reference]
    return argv + (["--source", str(source)] if source else [])


def make_fixture(name: str, args: argparse.Namespace, work: Path) -> dict:
    layout, n = FIXTURES[name], nproc(name)
    run_dir = work / name / "run"
    shutil.rmtree(work / name, ignore_errors=True)
    (work / name).mkdir(parents=True)
    row: dict = {"name": name, **layout, "pattern": model_fields(name)["hybrid_layer_pattern"], "steps": args.steps,
                 "attempts": []}
    source = None
    if args.train == "cli":
        cli = ["-m", "hybrid_megatron", "pretrain", "configs/tiny.yaml", *overrides(name, run_dir, args.steps)]
        code, tail = launch(n, cli, args.timeout_s, work / name / "train_cli.log")
        row["attempts"].append({"how": "pretrain CLI", "exit": code, **({"tail": tail} if code else {})})
        if code == 0:
            source, row["trained_by"] = run_dir / "checkpoints", "pretrain CLI"
            losses = [json.loads(x)["loss"] for x in (run_dir / "losses.jsonl").read_text().splitlines()]
            row["loss_first"], row["loss_last"] = losses[0], losses[-1]
        else:
            print(f"[{name}] pretrain CLI failed (exit {code}); training in a worker instead. Output tail:\n{tail}",
                  file=sys.stderr)
    if source is None:
        dest, info = work / name / "trained", work / name / "train_info.json"
        argv = worker_argv("train", name, run_dir, args.steps, layout, dest, info)
        code, tail = launch(n, argv, args.timeout_s, work / name / "train_worker.log")
        row["attempts"].append({"how": "in-process worker", "exit": code, **({"tail": tail} if code else {})})
        if code != 0:
            return {**row, "status": "failed", "error": f"training failed (exit {code}): {tail[-600:]}"}
        losses = json.loads(info.read_text())["losses"]
        source, row["trained_by"] = dest, "in-process worker (components of pretrain, no CLI)"
        row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    out_dir = Path(args.out) / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    info = work / name / "record_info.json"
    reference = "te" if name in TE_REFERENCE else args.reference
    argv = worker_argv("record", name, run_dir, args.steps, layout, out_dir, info, source, reference)
    code, tail = launch(n, argv, args.timeout_s, work / name / "record.log")
    if code != 0:
        return {**row, "status": "failed", "error": f"recording failed (exit {code}): {tail[-1200:]}"}
    row.update(json.loads(info.read_text()))
    try:
        row.update(check_fixture(out_dir, args.max_fixture_bytes))
    except Exception as exc:
        return {**row, "status": "failed", "error": f"fixture check: {exc}"}
    from hybrid_megatron.training.environment import versions  # the same version record the benchmarks write

    meta = {k: v for k, v in row.items() if k not in ("attempts",)}
    meta.update(recorded=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=versions(), device=device_name())
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {**row, "status": "ok"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="tp1,tp2,pp2", help=f"comma list of {', '.join(FIXTURES)}")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "convert"), help="fixture root (<out>/<name>/)")
    ap.add_argument("--work", default="/tmp/convert_fixtures_work", help="training runs and logs")
    ap.add_argument("--steps", type=int, default=400,
                    help="training steps (32k tokens each). At 200 the logits held near-ties that bf16 rounding flips "
                         "(98.67%% top-1 on tp1, the exact export run in bf16 included); 400 reached 99.67%%")
    ap.add_argument("--reference", choices=("fp32", "te"), default="fp32",
                    help="fp32: strict fp32 logits (local spec, no TF32); te: the TE model's logits (TF32 GEMMs). "
                         f"Always te for {', '.join(TE_REFERENCE)} (MoE layers need TE's grouped GEMM)")
    ap.add_argument("--train", choices=("cli", "worker"), default="cli",
                    help="cli: the pretrain CLI (falls back to the worker on failure); worker: components directly")
    ap.add_argument("--timeout-s", type=float, default=240.0, help="per launched process")
    ap.add_argument("--max-fixture-bytes", type=int, default=MAX_FIXTURE_BYTES)
    ap.add_argument("--summary", default=None, help="summary JSON (default <work>/summary.json)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to assume (default: nvidia-smi -L)")
    # internal: one rank of a worker
    ap.add_argument("--worker", choices=("train", "record"), help=argparse.SUPPRESS)
    for flag in ("--fixture", "--run-dir", "--layout", "--dest", "--source", "--info"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.fixtures.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIXTURES]
    if unknown or not names:
        ap.error(f"--fixtures: unknown {unknown} (known: {', '.join(FIXTURES)})")
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    summary_path = Path(args.summary or work / "summary.json")
    gpus = visible_gpus() if args.gpus is None else args.gpus
    summary = {"gpus": gpus, "out": args.out, "fixtures": []}
    for name in args.names:
        start = time.perf_counter()
        if nproc(name) > gpus:
            row = {"name": name, **FIXTURES[name], "status": "skipped", "error": f"needs {nproc(name)} GPUs, {gpus} visible"}
        else:
            try:
                row = make_fixture(name, args, work)
            except Exception as exc:  # keep going with the next fixture; the summary says what broke
                row = {"name": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        summary["fixtures"].append(row)
        summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"[{name}] {row['status']} in {row['seconds']} s {row.get('error', '')[:300]}", flush=True)
    total = sum(r.get("bytes", 0) for r in summary["fixtures"])
    summary["total_bytes"] = total
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\n{'fixture':<8}{'status':<9}{'tp':>3}{'pp':>3}{'loss':>14}{'reload diff':>13}{'TE-TF32 diff':>14}"
          f"{'logit max':>11}{'bytes':>11}  trained by")
    for r in summary["fixtures"]:
        loss = f"{r['loss_first']:.2f}->{r['loss_last']:.2f}" if "loss_last" in r else "-"
        diff = f"{r['reload_max_abs_diff']:.1e}" if "reload_max_abs_diff" in r else "-"
        tf32 = f"{r['te_tf32_max_abs_diff']:.1e}" if "te_tf32_max_abs_diff" in r else "-"
        scale = f"{r['logit_scale']:.2f}" if "logit_scale" in r else "-"
        print(f"{r['name']:<8}{r['status']:<9}{r.get('tp', '-'):>3}{r.get('pp', '-'):>3}{loss:>14}{diff:>13}{tf32:>14}"
              f"{scale:>11}{r.get('bytes', 0):>11,}  {r.get('trained_by', r.get('error', ''))[:60]}")
    print(f"total {total:,} bytes in {args.out}; summary {summary_path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary["fixtures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
