"""`hybrid-megatron <verb>`: a thin dispatcher.

Each verb lives next to what it drives and exposes ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed namespace, returns an exit code). Modules are imported here, so
they must keep heavy imports (torch, megatron) inside their functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from data_pipeline.errors import UserError

# verb modules, in the order `--help` lists them
_VERB_MODULES = (
    "hybrid_megatron.training.cli",  # pretrain
    "data_pipeline.cli",  # prepare-data, data audit
    "hybrid_megatron.convert.cli",  # convert to-hf / from-hf
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-megatron", description="Pretrain hybrid Mamba/attention models on megatron-core."
    )
    parser.add_argument("--log-level", default="INFO", help="python logging level (default INFO)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in _VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (key=value) may come before or after options like --dry-run; argparse stops collecting
    # a nargs="*" positional at the first option, so the rest arrive as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
