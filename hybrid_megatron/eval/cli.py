"""`hybrid-megatron compare RUN_DIR... --out DIR` (CPU)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("compare", help="runs side by side: loss against tokens and FLOPs, scaling fit (CPU)",
                       description="Train and validation loss of several run directories on one plot, their "
                                   "final losses side by side, and with three or more sizes a fit of "
                                   "L(N) = E + A N^-alpha to the final validation losses.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by pretrain")
    p.add_argument("--out", required=True, metavar="DIR", help="writes summary.json, report.md and PNG plots here")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from hybrid_megatron.eval.compare import compare

    summary = compare(args.runs, args.out)
    fit = summary["scaling_fit"]
    for r in summary["runs"]:
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        print(f"{r['name']}: {r['params']:,} params, {r['tokens']:,} tokens, train {r['final_train_loss']:.4f}, "
              f"validation {val}")
    if fit:
        print(f"scaling fit: alpha {fit['alpha']:.4f}, E {fit['E']:.4f}, A {fit['A']:.4g}, alpha 95% interval "
              f"{fit['alpha_ci']}")
    for flag in summary["red_flags"]:
        print(f"red flag: {flag}")
    print(f"report: {args.out}/report.md")
    return 0
