"""`hybrid-megatron eval CKPT --suite ...` (GPU); `compare RUN_DIR... --out DIR`, `inspect CKPT` and
`ladder SPEC --out DIR` (CPU)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from hybrid_megatron.eval.size_units import SIZE_MEASURES

    _register_eval(sub)
    p = sub.add_parser("compare", help="runs side by side: loss against tokens and FLOPs, size laws per "
                                       "architecture family (CPU)",
                       description="Train and validation loss of several run directories on one plot, their "
                                   "final losses side by side; runs grouped into architecture families (the same "
                                   "layer-pattern unit and non-size fields), and for each family with three or more "
                                   "sizes a fit of L(N) = E + A N^-alpha to the final validation losses.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories written by pretrain")
    p.add_argument("--ladder", metavar="DIR", help="the runs of a ladder planned into DIR (`ladder SPEC --out DIR`), "
                                                   "grouped as its spec names the families, those not started left "
                                                   "out, the laws read at its large run (or 7B); instead of RUN_DIRs")
    p.add_argument("--out", metavar="DIR", help="writes summary.json, report.md and PNG plots here (with --ladder: "
                                                "default DIR/compare)")
    p.add_argument("--size-by", default="params", choices=SIZE_MEASURES, dest="size_measure",
                   help="what the size laws are fitted against: params (total, the default), non-embedding (Kaplan's "
                        "N), active (an MoE's routed experts counted at top-k) or flops (the training compute up to "
                        "the last validation: architectures compared at equal compute)")
    p.add_argument("--predict", metavar="N", help="read every family's law at size N (7e9, 7B, 350M; with --size-by "
                                                  "flops a budget such as 1e23), with a bootstrap interval, and set "
                                                  "the families against the first")
    p.add_argument("--budget", metavar="FLOPS", help="each family's compute-optimal size and tokens for this many "
                                                     "training FLOPs (1e23), from its L(N, D) (runs at two or more "
                                                     "token budgets)")
    p.add_argument("--source", metavar="NAME", help="fit the size laws to this validation source's loss (one of the "
                                                    "data config's validation sources) instead of the overall one")
    p.add_argument("--partial", action="store_true", help="leave out (and list) runs that have not started: a "
                                                          "ladder compared while it trains")
    p.add_argument("--family", action="append", metavar="LABEL=RUN_DIR,...",
                   help="put these runs in one family called LABEL (repeatable), where the pattern rule does not fit")
    p.set_defaults(func=_compare)
    _register_inspect(sub)
    _register_ladder(sub)


def _compare(args: argparse.Namespace) -> int:
    from data_pipeline.errors import ConfigError
    from hybrid_megatron.eval import families, size_units
    from hybrid_megatron.eval.compare import compare

    predict = size_units.parse_size(args.predict) if args.predict else None
    budget = size_units.parse_size(args.budget, "--budget") if args.budget else None
    runs, out, family_of, partial = args.runs, args.out, families.parse_assignments(args.family), args.partial
    if args.ladder:
        from hybrid_megatron.eval.ladder import read_plan

        if args.runs or args.family:
            raise ConfigError("compare: --ladder takes its runs and families from the plan; pass no RUN_DIR or --family")
        plan = read_plan(args.ladder)
        runs, family_of, partial = [run_dir for run_dir, _ in plan["runs"]], dict(plan["runs"]), True
        predict, budget = predict or plan["predict"], budget or plan["budget"]
        out = out or str(Path(args.ladder) / "compare")
    elif not runs or not out:
        raise ConfigError("compare: pass run directories and --out DIR, or --ladder DIR")
    _print_comparison(compare(runs, out, args.size_measure, predict, family_of, partial, budget, args.source))
    print(f"report: {out}/report.md")
    return 0


def _print_comparison(summary: dict) -> None:
    from hybrid_megatron.eval import size_fits

    if summary["not_started"]:
        print(f"not started yet, left out: {', '.join(summary['not_started'])}")
    for u in summary["unfinished"]:
        print(f"{u['name']}: step {u['step']:,} of {u['planned']:,}, left out of the size laws until it finishes")
    for r in summary["runs"]:
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        print(f"{r['name']} [{r['family']}]: {r['params']:,} params, {r['tokens']:,} tokens, "
              f"train {r['final_train_loss']:.4f}, validation {val}")
        for series in ("loss", "grad_norm"):
            found = r["health"][series]
            if found and found["spikes"]:
                worst = found["largest"][0]
                print(f"  {found['spikes']} {series} spike(s) ({found['score']:.2%} of scored steps), the largest at "
                      f"step {worst['step']} ({worst['z']:.0f} sigma)")
    for fam in summary["families"]:
        fit = fam["scaling_fit"]
        if fit:
            ci = fit["alpha_ci"]
            ci_text = f"alpha 95% interval {ci[0]:.4f}-{ci[1]:.4f}" if ci else fit["note"]
            print(f"scaling fit [{fam['label']}]: alpha {fit['alpha']:.4f}, E {fit['E']:.4f}, A {fit['A']:.4g}; "
                  f"{ci_text}")
            if fit["backtest"]:
                test = fit["backtest"]
                print(f"  backtest: fitted without the largest size, it predicts {test['predicted']:.4f} there against "
                      f"{test['actual']:.4f} measured ({test['error']:+.2%})")
        for flag in fam["red_flags"]:
            print(f"red flag [{fam['label']}]: {flag}")
    if summary["prediction"]:
        print("\n".join(size_fits.prediction_lines(summary["prediction"])))
    if summary["compute_optimal"]:
        print("\n".join(size_fits.compute_optimal_lines(summary["compute_optimal"])))
    for flag in summary["comparison_flags"]:
        print(f"red flag: {flag}")


def _register_eval(sub) -> None:
    from hybrid_megatron.eval.suites import SUITES

    p = sub.add_parser("eval", help="evaluate a checkpoint: validation loss, loss by position, lm-eval tasks (GPU)",
                       description="Evaluates a checkpoint on one or more GPUs (torchrun or srun for several) and "
                                   "writes results.json, report.md and PNG plots. Suites: "
                                   + "; ".join(f"{s.name}: {s.summary}" for s in SUITES.values())
                                   + ". Overrides (key=value) apply to the checkpoint's run config, e.g. "
                                     "parallel.tensor_model_parallel_size=2 or data=PATH.")
    p.add_argument("checkpoint", help="a step dir, or a save dir whose 'latest' is followed")
    p.add_argument("overrides", nargs="*", default=[], help="key.path=value overrides of the checkpoint's run config")
    p.add_argument("--suite", required=True, help=f"comma-separated suites ({', '.join(SUITES)})")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <run dir>/eval/<step dir>)")
    p.add_argument("--config", metavar="YAML", help="run config supplying what a model-only checkpoint lacks "
                                                    "(data, parallel): e.g. after convert from-hf")
    p.add_argument("--lengths", default="1,2,4,8", help="length: multiples of the training length (default 1,2,4,8)")
    p.add_argument("--bin-size", type=int, help="length: positions per bin (default: training length / 8)")
    p.add_argument("--length-tokens", type=int, help="length: tokens per length (default data.validation.tokens)")
    p.add_argument("--tasks", help="lm-eval: comma-separated task names")
    p.add_argument("--task-dir", type=Path, help="lm-eval: a directory of task YAMLs (relative data files resolve "
                                                 "against it)")
    p.add_argument("--limit", type=int, help="lm-eval: at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples (default: each task's)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval: batch size (default 8)")
    p.add_argument("--kv-pairs", help="mqar/state: key-value pairs per item (default: the training source's)")
    p.add_argument("--seq-lens", help="mqar/state: item lengths (default: the training source's)")
    p.add_argument("--items", type=int, default=512, help="mqar/state: items per (pairs, length) cell (default 512)")
    p.add_argument("--seed", type=int, help="mqar/state: seed of the items (default: one the run's sources did not use)")
    p.add_argument("--attention-window", type=int, default=0,
                   help="state: tokens before the first query that attention still sees under its cut (default 0)")
    p.add_argument("--niah-items", type=int, default=8, help="niah: pass keys per (length, depth) cell (default 8)")
    p.add_argument("--niah-depths", type=int, default=11, help="niah: depths from 0%% to 100%% (default 11)")
    p.add_argument("--prompts", type=int, default=32, help="generation: held-out prompts (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="generation: tokens per prompt (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="generation: tokens per continuation (default 200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from hybrid_megatron.eval import run
    from hybrid_megatron.eval.suites import EvalOptions, parse_ints, parse_lengths, parse_list, parse_suites
    from hybrid_megatron.training.distributed import discover_ranks

    opts = EvalOptions(suites=parse_suites(args.suite), lengths=parse_lengths(args.lengths), bin_size=args.bin_size,
                       length_tokens=args.length_tokens,
                       tasks=parse_list(args.tasks, "--tasks") if args.tasks is not None else [],
                       task_dir=args.task_dir, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, progress=not args.no_progress,
                       kv_pairs=parse_ints(args.kv_pairs, "--kv-pairs") if args.kv_pairs else None,
                       seq_lens=parse_ints(args.seq_lens, "--seq-lens") if args.seq_lens else None,
                       items=args.items, seed=args.seed, attention_window=args.attention_window,
                       niah_items=args.niah_items, niah_depths=args.niah_depths, prompts=args.prompts,
                       prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens)
    base = None
    if args.config:
        from hybrid_megatron.config import load_run_config

        base = load_run_config(args.config, [])
    step_dir, cfg = run.resolve(args.checkpoint, args.overrides, opts, discover_ranks().world_size, base)
    out = Path(args.out) if args.out else run.default_out(step_dir)
    results = run.evaluate(step_dir, cfg, opts, out)
    if results is not None:
        from hybrid_megatron.eval.report import headline

        for name, value in headline(results).items():
            print(f"{name}: {value:.4f}")
        print(f"report: {out}/report.md")
    return 0


def _register_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="a checkpoint's weights by layer and its SSM heads' memory timescales (CPU)",
                       description="Reads a checkpoint on a CPU (no forward): every layer's weight RMS, with --against "
                                   "how far each layer moved from another checkpoint (the initial weights, an earlier "
                                   "step), and each Mamba-2 / Gated DeltaNet head's decay horizon "
                                   "1 / (exp(A_log) softplus(dt_bias)) against the training length. Writes "
                                   "inspect.json, report.md and PNG plots.")
    p.add_argument("checkpoint", help="a step dir, or a save dir whose 'latest' is followed")
    p.add_argument("--against", metavar="CKPT", help="another checkpoint of the same architecture: relative change "
                                                     "||W - W0|| / ||W0|| per layer and tensor")
    p.add_argument("--context", type=int, metavar="N", help="the training length heads are counted against (default: "
                                                            "the one the checkpoint's run config records)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <run dir>/inspect/<step dir>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from data_pipeline.errors import ConfigError
    from hybrid_megatron.checkpoint import layout
    from hybrid_megatron.eval import run, weights, weights_report

    if args.context is not None and args.context < 1:
        raise ConfigError(f"--context {args.context}: must be >= 1")
    step_dir = layout.resolve_step_dir(args.checkpoint)
    out = Path(args.out) if args.out else run.default_out(step_dir, "inspect")  # before the reading, not after
    result = weights.inspect(step_dir, args.against, args.context, progress=not args.no_progress)
    weights_report.write(result, out)
    for layer in result["layers"]:
        ssm = layer.get("ssm")
        change = f", moved {layer['relative_change']:.3f}" if layer.get("relative_change") is not None else ""
        heads = (f"; {ssm['heads']} heads, tau {ssm['min']:.3g}-{ssm['max']:.3g} tokens (median {ssm['median']:.3g})"
                 if ssm else "")
        print(f"layer {layer['index']} {layer['type']}: weight RMS {layer['rms']:.4f}{change}{heads}")
    print(f"report: {out}/report.md")
    return 0


def _register_ladder(sub) -> None:
    p = sub.add_parser("ladder", help="plan a model ladder: every family of a spec at every size, configs written (CPU)",
                       description="Plans the runs that decide which architecture gets the large run: each family "
                                   "(a layer-pattern unit) at each rung (a parameter target and a depth), the width "
                                   "searched for the target, the base's data scaled to tokens_per_param tokens per "
                                   "parameter. Writes a run config per run, ladder.json and ladder.md (the table and "
                                   "the commands); `compare` on the runs afterwards fits each family's law.")
    p.add_argument("spec", help="ladder YAML (configs/ladders/hybrid_families.yaml is an example)")
    p.add_argument("--out", required=True, metavar="DIR", help="configs/, ladder.json and ladder.md go here; the runs "
                                                               "train into DIR/runs/<family>-<size>")
    p.add_argument("--overwrite", action="store_true", help="replace a plan already in DIR")
    p.set_defaults(func=_ladder)


def _ladder(args: argparse.Namespace) -> int:
    from data_pipeline.errors import ConfigError
    from hybrid_megatron.eval import ladder
    from hybrid_megatron.eval.size_units import count_text

    out = Path(args.out)
    if (out / "ladder.json").exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds a ladder plan (ladder.json); pass --overwrite to replace it")
    spec = ladder.load_spec(args.spec)
    summary = ladder.write(ladder.plan(spec, out), spec, args.spec, out)
    print(f"{'run':<28}{'layers':>7}{'hidden':>8}{'params':>9}{'tokens':>9}{'FLOPs':>10}{'GiB/GPU':>9}")
    for r in summary["runs"]:
        print(f"{r['run']:<28}{r['layers']:>7}{r['hidden_size']:>8}{count_text(r['params']):>9}"
              f"{count_text(r['tokens']):>9}{r['training_flops']:>10.3g}{r['peak_gib']:>9.1f}")
    over = [r["run"] for r in summary["runs"] if r["over_memory"]]
    if over:
        print(f"warning: {len(over)} run(s) above {spec.gpu_memory_gib:g} GiB per GPU by the dry run's estimate "
              f"({', '.join(over)}): lower their train.micro_batch_size (a rung override) or add GPUs")
    print(f"configs: {out}/configs; then {summary['compare']}")
    return 0
