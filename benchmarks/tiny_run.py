"""The quickstart run to its end, recorded: ``pretrain configs/tiny.yaml`` on one GPU, then a summary.

    python benchmarks/tiny_run.py [--out benchmarks/results/tiny_h100.json] [--timeout-s 560]

Runs ``python -m hybrid_megatron pretrain configs/tiny.yaml logging.run_dir=RUN_DIR`` in a child process
and summarizes its ``losses.jsonl``: the loss at step 1 and in windows along the run, per phase, against
the unigram entropy of the same pretraining mix (label-token frequencies of the loader's first
``--entropy-steps`` steps, computed here on the CPU: a model that beats it has learned context);
tokens/s over the steady steps (from the records' wall times); the LR the optimizer applied at the
anneal's re-warm peak and at the last step against the plan (0.75 x peak, then zero); checkpoints
committed. The JSON carries device, versions, config and command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.devtools.bench import tokens_per_s

CONFIG = "configs/tiny.yaml"


def unigram_entropy(data_config, steps: int) -> dict:
    """Entropy (nats) of the label tokens the loader serves in its first ``steps`` steps."""
    import numpy as np

    from data_pipeline.loader import build_loader

    loader = build_loader(data_config, 0, 1)
    counts = np.zeros(0, dtype=np.int64)
    tokens = 0
    try:
        for _ in range(steps):
            batch = next(loader)
            labels = batch.labels.reshape(-1)
            binc = np.bincount(labels)
            if binc.size > counts.size:
                counts = np.pad(counts, (0, binc.size - counts.size))
            counts[: binc.size] += binc
            tokens += labels.size
    finally:
        loader.close()
    p = counts[counts > 0] / tokens
    return {"nats": float(-(p * np.log(p)).sum()), "tokens": int(tokens), "steps": steps}


def summarize(records: list[dict], cfg) -> dict:
    """Loss windows, per-phase means, steady tokens/s and the applied LR at the anneal's landmarks."""
    by_step = {r["step"]: r for r in records}
    steps = sorted(by_step)
    out: dict = {"steps_run": len(steps), "loss_first_step": by_step[steps[0]]["loss"] if steps else None}
    if not steps:
        return out
    windows = {}
    for end in sorted({*range(100, len(steps) + 1, 100), len(steps)}):
        chunk = [by_step[s]["loss"] for s in steps[max(0, end - 10): end]]
        windows[f"{steps[max(0, end - 10)]}-{steps[end - 1]}"] = sum(chunk) / len(chunk)
    out["mean_loss_last_10_by_window"] = windows
    phases: dict[str, list[float]] = {}
    for s in steps:
        phases.setdefault(by_step[s].get("phase", "?"), []).append(by_step[s]["loss"])
    out["mean_loss_by_phase_last_20"] = {k: sum(v[-20:]) / len(v[-20:]) for k, v in phases.items()}
    rate = tokens_per_s([by_step[s] for s in steps], skip=10)
    if rate is not None:
        out["tokens_per_s_steady"] = rate
    anneal = [by_step[s] for s in steps if by_step[s].get("phase") == cfg.data.phases[-1].name]
    if anneal and cfg.data.phases[-1].replay > 0:
        peak_at = anneal[0]["step"] - 1 + cfg.schedule.anneal_warmup_steps
        out["anneal_lr"] = {
            "planned_peak": cfg.schedule.anneal_peak_lr_fraction * cfg.optim.lr,
            "applied_at_peak_step": by_step[peak_at]["lr"] if peak_at in by_step else None,
            "applied_at_last_step": by_step[steps[-1]]["lr"],
            "planned_last": 0.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    from hybrid_megatron.devtools.gpu_launch import device_name, launch
    from hybrid_megatron.training.environment import versions

    from data_pipeline.errors import DataError
    from data_pipeline.loader import config_vocab_size
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="/tmp/tiny_run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiny_run.json"))
    ap.add_argument("--timeout-s", type=float, default=560.0)
    ap.add_argument("--entropy-steps", type=int, default=300)
    ap.add_argument("overrides", nargs="*", help="extra pretrain overrides")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        ap.error(f"--run-dir {run_dir} is not empty: the run must start from scratch")
    overrides = [f"logging.run_dir={run_dir}", *args.overrides]
    cfg = load_run_config(ROOT / CONFIG, overrides)
    cmd = ["-m", "hybrid_megatron", "pretrain", CONFIG, *overrides]
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    code, tail = launch(1, cmd, args.timeout_s, run_dir.parent / f"{run_dir.name}.log",
                        progress=lambda t: print(f"... {t:.0f} s", flush=True))
    seconds = time.perf_counter() - start
    losses = run_dir / "losses.jsonl"
    records = [json.loads(x) for x in losses.read_text().splitlines()] if losses.is_file() else []
    result = {"exit": code, "seconds": round(seconds, 1), **summarize(records, cfg)}
    params = None
    try:  # the run builds the sample data first; a run that failed before that leaves none to read
        result["unigram_entropy_of_pretrain_mix"] = unigram_entropy(cfg.data, args.entropy_steps)
        vocab = cfg.model.vocab_size or config_vocab_size(cfg.data)
        params = num_parameters(cfg.model, padded_vocab_size(vocab, cfg.model, 1))
    except DataError as exc:
        result["unigram_entropy_of_pretrain_mix"] = {"error": str(exc)}
    latest = run_dir / "checkpoints" / "latest"
    result["latest_checkpoint"] = latest.read_text().strip() if latest.is_file() else None
    if code != 0:
        result["log_tail"] = tail[-2000:]
    record = {"what": f"{CONFIG} trained from the sample shards on one GPU, to the end", "device": device_name(),
              "versions": versions(), "command": "python -m hybrid_megatron pretrain " + " ".join(cmd[3:]),
              "config": {"pattern": cfg.model.hybrid_layer_pattern,
                         "params": params,
                         "global_batch_tokens": cfg.data.global_batch_tokens},
              "result": result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    entropy = result["unigram_entropy_of_pretrain_mix"].get("nats", math.nan)
    last = list(result.get("mean_loss_last_10_by_window", {}).values())[-1:] or [math.nan]
    print(f"exit {code} after {seconds:.0f} s, {result['steps_run']} steps; loss {result['loss_first_step']} -> "
          f"{last[0]:.3f} nats (unigram entropy {entropy:.3f}); {result.get('tokens_per_s_steady', 0):,.0f} tok/s; "
          f"anneal LR {result.get('anneal_lr')}; results: {args.out}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
