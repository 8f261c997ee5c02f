"""Context parallelism at long context: tokens/s and peak memory per GPU, the 1B hybrid against attention only.

    python benchmarks/cp_throughput.py                          # seq 32k/64k/128k x CP 1, 2, 4, 8 (as GPUs allow)
    python benchmarks/cp_throughput.py --seqs 32768 --cp 1,2 --models hybrid,attention --steps 4

Each row is a real ``pretrain`` of a long-context recipe (``configs/long_context/1b_{32,64,128}k.yaml``: the
model of configs/1b.yaml) on CP GPUs (DP 1) under torch.distributed.run, from fresh weights, on the sample data
(a byte vocabulary: the output layer weighs less than with a real tokenizer's):
``--warmup`` untimed steps, then ``--steps`` timed ones of ``--sequences`` sequences each. ``attention`` is its
attention-only twin at the same widths and about the same parameters (``ATTENTION_PATTERN``). Recompute is none
where the dry run's estimate fits the GPU, else full (the row says which). tokens/s counts input tokens over the
timed steps' wall time (``losses.jsonl``'s ``input_tokens`` and times); peak memory is rank 0's largest allocation, from the last
training log line; beside it the dry run's estimate. Each run's log stays under ``--work-dir``. The JSON is
rewritten after every row, a PNG of tokens/s per GPU beside it. ``pretrain`` refuses CP > 1 until the ``cp``
suite of tools/loss_parity.py has passed; those rows then fail with its one line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.devtools.bench import ResultFile, fmt, tokens_per_s
from hybrid_megatron.devtools.gpu_launch import device_name, gpu_memory_bytes, launch, visible_gpus

RECIPES = {32768: "configs/long_context/1b_32k.yaml", 65536: "configs/long_context/1b_64k.yaml",
           131072: "configs/long_context/1b_128k.yaml"}
ATTENTION_PATTERN = "*-" * 23  # 23 attention + 23 MLP layers at the hybrid's widths: 1.01B against its 1.03B
MODELS = {"hybrid": (), "attention": (f"model.hybrid_layer_pattern={ATTENTION_PATTERN}",)}
FIT = 0.92  # of the GPU's memory: what the estimate may use before recompute=full is chosen
_MEM = re.compile(r"\bmem ([0-9.]+)GiB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default=",".join(map(str, RECIPES)), help="sequence lengths (each has a recipe)")
    ap.add_argument("--cp", default=None, help="CP sizes (default: 1, 2, 4, 8 up to the visible GPUs)")
    ap.add_argument("--models", default="hybrid,attention", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (start-up, autotuning)")
    ap.add_argument("--sequences", type=int, default=2, help="sequences per optimizer step (micro-batches of one)")
    ap.add_argument("--timeout-s", type=float, default=480.0, help="per run")
    ap.add_argument("--work-dir", default=None, help="run directories and logs (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cp_throughput.json"))
    args = ap.parse_args(argv)
    try:
        args.seqs = [int(s) for s in args.seqs.split(",")]
        args.cp = [int(c) for c in args.cp.split(",")] if args.cp else None
    except ValueError:
        ap.error("--seqs and --cp take comma lists of integers")
    if unknown := [s for s in args.seqs if s not in RECIPES]:
        ap.error(f"--seqs {unknown}: no recipe; one of {sorted(RECIPES)}")
    args.models = args.models.split(",")
    if unknown := [m for m in args.models if m not in MODELS]:
        ap.error(f"--models {unknown}: one of {sorted(MODELS)}")
    if min(args.steps, args.sequences) < 1 or args.warmup < 0:
        ap.error("--steps and --sequences must be positive, --warmup not negative")
    return args


def overrides(model: str, seq: int, cp: int, steps: int, sequences: int, run_dir: Path, recompute: str) -> list[str]:
    """The recipe's overrides for one row: fresh weights, CP on CP GPUs (DP 1), a short run, no checkpoints."""
    return [*MODELS[model], "checkpoint.load=null", "checkpoint.load_weights_only=false",
            f"parallel.context_parallel_size={cp}", f"data.global_batch_tokens={sequences * seq}",
            "data.batch_size_multiple=1", f"train.train_steps={steps}", f"train.recompute={recompute}",
            "checkpoint.save_final=false", "checkpoint.save_interval=null", "logging.log_interval=1",
            "logging.tensorboard=false", f"logging.run_dir={run_dir}"]


def plan(seqs: list[int], cps: list[int], models: list[str], gpu_bytes: int, steps: int, sequences: int,
         work_dir: Path) -> list[dict]:
    """One row per (model, seq, CP): its overrides and the dry run's estimate; recompute=full where none does not
    fit ``FIT`` of the GPU (as estimated). Refused settings (a config error) become the row's error."""
    from data_pipeline.errors import ConfigError
    from data_pipeline.loader import config_vocab_size
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters
    from hybrid_megatron.training.dry_run import peak_memory_bytes

    rows = []
    for seq in seqs:
        for cp in cps:
            for model in models:
                row = {"model": model, "seq_len": seq, "cp": cp, "gpus": cp, "recipe": RECIPES[seq]}
                run_dir = work_dir / f"{model}-{seq}-cp{cp}"
                try:
                    for recompute in ("none", "full"):
                        sets = overrides(model, seq, cp, steps, sequences, run_dir, recompute)
                        cfg = load_run_config(ROOT / RECIPES[seq], sets)
                        estimate = peak_memory_bytes(cfg, world_size=cp)
                        if estimate <= FIT * gpu_bytes:
                            break
                    row.update(recompute=recompute, estimate_gb=estimate / 1e9, overrides=sets,
                               params=num_parameters(cfg.model, padded_vocab_size(config_vocab_size(cfg.data),
                                                                                  cfg.model, 1)))
                except ConfigError as exc:
                    row["error"] = str(exc)
                rows.append(row)
    return rows


def peak_gib(log_text: str) -> float | None:
    """Rank 0's peak allocation from the last training log line (``mem 12.3GiB``), None when none was logged."""
    found = _MEM.findall(log_text)
    return float(found[-1]) if found else None


def timed_rate(records: list[dict], warmup: int) -> dict | None:
    """Input tokens per second and seconds per step over the steps after ``warmup`` (``losses.jsonl``: one record
    per step from step 1, each ``time`` its step's end)."""
    skip = max(warmup - 1, 0)  # the timing starts where the last warm-up step ended
    rate, timed = tokens_per_s(records, skip=skip), records[skip:]
    if rate is None:
        return None
    return {"step_s": (timed[-1]["time"] - timed[0]["time"]) / (len(timed) - 1), "tokens_per_s": rate}


def run_row(row: dict, args: argparse.Namespace) -> dict:
    run_dir = Path(next(s for s in row["overrides"] if s.startswith("logging.run_dir=")).partition("=")[2])
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = ["-m", "hybrid_megatron", "pretrain", row["recipe"], *row["overrides"]]
    code, tail = launch(row["cp"], argv, args.timeout_s, run_dir / "console.log",
                        progress=lambda s: print(f"  {row['model']} seq {row['seq_len']} CP {row['cp']}: {s:.0f}s",
                                                 flush=True))
    log_text = (run_dir / "console.log").read_text()
    losses = run_dir / "losses.jsonl"
    records = [json.loads(line) for line in losses.read_text().splitlines()] if losses.exists() else []
    rate = timed_rate(records, args.warmup)
    out = {**row, "exit_code": code, "log": str(run_dir / "console.log"), "peak_gib": peak_gib(log_text),
           "steps_done": len(records)}
    if rate:
        out.update(rate, tokens_per_s_per_gpu=rate["tokens_per_s"] / row["gpus"])
    if code != 0 or not rate:
        lines = tail.strip().splitlines()
        out["error"] = (lines[-1][:300] if lines else "") or f"exit {code}"
    return out


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<10}{'seq':>8}{'CP':>4}{'recompute':>10}{'tok/s':>10}{'tok/s/GPU':>11}{'peak GiB':>10}"
          f"{'est. GB':>9}  status")
    for r in rows:
        print(f"{r['model']:<10}{r['seq_len']:>8}{r['cp']:>4}{r.get('recompute', '-'):>10}"
              f"{fmt(r.get('tokens_per_s'), ',.0f'):>10}{fmt(r.get('tokens_per_s_per_gpu'), ',.0f'):>11}"
              f"{fmt(r.get('peak_gib'), '.1f'):>10}{fmt(r.get('estimate_gb'), '.1f'):>9}  {r.get('error', 'ok')[:60]}")
    for what, r in ratios(rows):
        print(f"{what:<48}{r:>8.3f}")


def ratios(rows: list[dict]) -> list[tuple[str, float]]:
    """hybrid / attention tokens/s at each (seq, CP); each model's tokens/s per GPU at CP n over CP 1."""
    ok = {(r["model"], r["seq_len"], r["cp"]): r for r in rows if r.get("tokens_per_s")}
    out = []
    for (model, seq, cp), r in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if model == "hybrid" and ("attention", seq, cp) in ok:
            out.append((f"hybrid / attention, seq {seq}, CP {cp}", r["tokens_per_s"] / ok["attention", seq, cp]["tokens_per_s"]))
        if cp > 1 and (model, seq, 1) in ok:
            out.append((f"{model} per-GPU CP {cp} / CP 1, seq {seq}",
                        r["tokens_per_s_per_gpu"] / ok[model, seq, 1]["tokens_per_s_per_gpu"]))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, seq), style in ((k, "-" if k[0] == "hybrid" else "--") for k in
                                sorted({(r["model"], r["seq_len"]) for r in rows})):
        pts = sorted((r["cp"], r["tokens_per_s_per_gpu"]) for r in rows
                     if (r["model"], r["seq_len"]) == (model, seq) and r.get("tokens_per_s_per_gpu"))
        if pts:
            ax.plot(*zip(*pts), style, marker="o", label=f"{model} {seq // 1024}k")
    ax.set(xscale="log", xlabel="CP size (GPUs)", ylabel="tokens/s per GPU", title="context parallelism, 1B")
    ax.set_xticks(sorted({r["cp"] for r in rows}), labels=[str(c) for c in sorted({r["cp"] for r in rows})])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from hybrid_megatron.training.environment import versions

    args = parse_args(argv)
    gpus = visible_gpus()
    if gpus < 1:
        print("error: benchmarks/cp_throughput.py needs a CUDA GPU (nvidia-smi lists none)", file=sys.stderr)
        return 2
    cps = args.cp or [c for c in (1, 2, 4, 8) if c <= gpus]
    if too_many := [c for c in cps if c > gpus]:
        print(f"error: --cp {too_many}: only {gpus} GPUs visible", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cp_throughput_"))
    rows = plan(args.seqs, cps, args.models, gpu_memory_bytes(), args.warmup + args.steps, args.sequences, work)
    result = ResultFile(args.out, {"benchmark": "cp_throughput", "command": " ".join(["python", *sys.argv]),
                                   "device": device_name(), "gpus": gpus, "versions": versions(),
                                   "settings": {k: v for k, v in vars(args).items() if k != "out"}})
    done = []
    for i, row in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {row['model']} seq {row['seq_len']} CP {row['cp']}", flush=True)
        done.append(row if "error" in row else run_row(row, args))
        result.add(done[-1])
    result.update(ratios=dict(ratios(done)))
    plot(done, Path(args.out).with_suffix(".png"))
    print_table(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
