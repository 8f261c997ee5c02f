"""`hybrid-megatron pretrain CONFIG [key=value ...] [--dry-run]`."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a hybrid model (one process per GPU: torchrun or srun)",
        description="Pretrain from a run config. Overrides are dotlists: optim.lr=3e-4 train.micro_batch_size=2; "
                    "data=PATH swaps in another data config.",
    )
    p.add_argument("config", help="run config YAML (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="key.path=value overrides")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, layer layout per pipeline stage, parameter count and FLOPs; no GPU needed",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="with --dry-run: GPUs the memory estimate assumes (DP = N / (TP x PP x CP)); default 8, one node",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrid_megatron.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    gpus = getattr(args, "gpus", None)
    if args.dry_run:
        from hybrid_megatron.training.dry_run import describe

        print(describe(cfg, world_size=8 if gpus is None else gpus))
        return 0
    if gpus is not None:
        log.warning("--gpus %d is ignored without --dry-run: the launcher's world size counts", gpus)
    from hybrid_megatron.training.distributed import check_layout_runs, require_gpu

    check_layout_runs(cfg)
    require_gpu()
    from hybrid_megatron.training.loop import pretrain

    return pretrain(cfg)
