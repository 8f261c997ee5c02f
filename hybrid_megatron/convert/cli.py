"""`hybrid-megatron convert to-hf | from-hf`: thin verbs over ``to_hf.export`` and ``from_hf.import_hf``."""

from __future__ import annotations

import argparse


def _to_hf(args: argparse.Namespace) -> int:
    from hybrid_megatron.convert.to_hf import ExportOptions, export

    export(
        args.ckpt_dir,
        args.out_dir,
        ExportOptions(
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
            keep_vocab_padding=args.keep_vocab_padding,
            max_shard_bytes=int(args.max_shard_size_gb * 1024**3),
            progress=not args.no_progress,
        ),
    )
    return 0


def _from_hf(args: argparse.Namespace) -> int:
    from hybrid_megatron.convert.from_hf import import_hf

    import_hf(
        args.hf_dir,
        args.ckpt_dir,
        dtype=args.dtype,
        overwrite=args.overwrite,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints to and from Hugging Face (NemotronH)")
    verbs = parser.add_subparsers(dest="convert_verb", metavar="DIRECTION", required=True)

    to_hf = verbs.add_parser("to-hf", help="torch_dist checkpoint -> Hugging Face NemotronHForCausalLM directory")
    to_hf.add_argument("ckpt_dir", help="a save dir (its 'latest' is followed) or one step dir")
    to_hf.add_argument("out_dir", help="output directory (must be empty or absent, unless --overwrite)")
    to_hf.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                       help="dtype of the written weights; A_log, D, dt_bias stay fp32 (default bf16)")
    to_hf.add_argument("--tokenizer", help="tokenizer dir (or a hub name in the local cache) to copy into the output; "
                       "default: the data tokenizer the checkpoint records (bytes is written as HF tokenizer files)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    to_hf.add_argument("--keep-vocab-padding", action="store_true",
                       help="keep the padded embedding/lm_head rows instead of trimming to the vocab size")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size (default 2)")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    to_hf.set_defaults(func=_to_hf)

    from_hf = verbs.add_parser("from-hf", help="Hugging Face NemotronH directory -> torch_dist checkpoint")
    from_hf.add_argument("hf_dir", help="a local Hugging Face model directory (config.json + safetensors)")
    from_hf.add_argument("ckpt_dir", help="save dir to write (step-000000/ and 'latest')")
    from_hf.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                         help="dtype of the stored weights; A_log, D, dt_bias stay fp32 (default bf16)")
    from_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty ckpt_dir")
    from_hf.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                         help="pad the embedding rows to a multiple of this, as the trainer does (default 128)")
    from_hf.set_defaults(func=_from_hf)
