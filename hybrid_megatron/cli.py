"""`hybrid-megatron <verb>`: a thin dispatcher.

Each verb lives next to what it drives and exposes ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed namespace, returns an exit code). Modules are imported here, so
they must keep heavy imports (torch, megatron) inside their functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from data_pipeline.errors import UserError
from hybrid_megatron import __version__

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# verb modules, in the order `--help` lists them
_VERB_MODULES = (
    "hybrid_megatron.training.cli",  # pretrain
    "data_pipeline.cli",  # prepare-data, data audit
    "hybrid_megatron.convert.cli",  # convert to-hf / from-hf
    "hybrid_megatron.eval.cli",  # eval, compare
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-megatron", description="Pretrain hybrid Mamba/attention models on megatron-core."
    )
    parser.add_argument("--version", action="version", version=f"hybrid-megatron {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="python logging level (default INFO); also accepted after the verb")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in _VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _hoist_log_level(argv: list[str]) -> list[str]:
    """``--log-level X`` (or ``=X``) anywhere on the line, moved before the verb, where argparse reads it."""
    rest, hoisted = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--log-level":
            hoisted += [arg, next(it, "")]
        elif arg.startswith("--log-level="):
            hoisted.append(arg)
        else:
            rest.append(arg)
    return hoisted + rest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _hoist_log_level(list(sys.argv[1:] if argv is None else argv))
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left (`data audit ... | head`) shows up here
        return code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
