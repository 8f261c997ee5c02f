"""Print a torch_dist checkpoint's keys, global shapes and dtypes, and its stored config, on CPU.

    python tools/inspect_checkpoint.py CKPT_DIR [--grep PATTERN] [--all]

CKPT_DIR is a save dir (its ``latest`` is followed) or one step dir. By default only model tensors are
listed (``--all`` adds optimizer and other state); byte objects (RNG, TE extra state) are counted.
"""

from __future__ import annotations

import argparse
import re
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from data_pipeline.errors import UserError
    from hybrid_megatron.checkpoint import layout
    from hybrid_megatron.checkpoint.safe_metadata import read_metadata
    from hybrid_megatron.convert import mapping

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir")
    parser.add_argument("--grep", help="only keys matching this regular expression")
    parser.add_argument("--all", action="store_true", help="list non-model tensors too (optimizer, ...)")
    args = parser.parse_args(argv)
    try:
        step_dir = layout.resolve_step_dir(args.ckpt_dir)
        metadata = read_metadata(step_dir).state_dict_metadata
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"# {step_dir}")
    for name in ("run_config.yaml", "train_state.json", "metadata.json"):
        path = step_dir / name
        if path.is_file():
            print(f"## {name}\n{path.read_text(errors='replace').rstrip()}")
    pattern = re.compile(args.grep) if args.grep else None
    total, num_bytes, shown = 0, 0, 0
    print("## tensors (global shape, dtype, stored chunks)")
    for key in sorted(metadata):
        meta = metadata[key]
        if isinstance(meta, BytesStorageMetadata):
            num_bytes += 1
            continue
        if not args.all and not mapping.is_model_key(key):
            continue
        if pattern and not pattern.search(key):
            continue
        numel = 1
        for s in meta.size:
            numel *= s
        total += numel
        shown += 1
        dtype = str(meta.properties.dtype).removeprefix("torch.")
        print(f"{key:72s} {str(list(meta.size)):20s} {dtype:9s} {len(meta.chunks)}")
    print(f"## {shown} tensors, {total:,} elements; {num_bytes} byte objects not listed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
