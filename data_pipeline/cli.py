"""CLI verbs of the data pipeline: ``prepare-data`` and ``data audit`` (registered by ``hybrid_megatron.cli``)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare-data", help="tokenise corpus files into webdataset token shards",
                              description="Tokenise .txt/.jsonl/.parquet files (plain, .gz or .zst) into tar "
                                          "shards of zstd token members plus index.json and stats.json. "
                                          "With --sample, build the standard-library sample corpus instead.")
    p.add_argument("--input", action="append", default=[], metavar="GLOB", help="input files (repeatable)")
    p.add_argument("--output", metavar="DIR", help="output directory (must be empty unless --overwrite)")
    p.add_argument("--source", metavar="NAME", help="source name recorded in stats.json")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a local Hugging Face tokenizer directory")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--workers", type=int, default=1, help="tokeniser processes (default 1)")
    p.add_argument("--member-tokens", type=int, default=262144, help="tokens per member (>= 65536)")
    p.add_argument("--shard-bytes", type=int, default=256 * 1024 * 1024, help="approximate shard size")
    p.add_argument("--holdout-fraction", type=float, default=0.0, metavar="F",
                   help="hold this share of documents out for validation (chosen by content, deterministically)")
    p.add_argument("--holdout-output", metavar="DIR", help="the validation source directory for held-out documents")
    p.add_argument("--tasks", type=int, default=0, metavar="N",
                   help="run as N datatrove tasks (--workers at a time), resumable: a rerun finishes what is "
                        "missing; default 0: one process")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="with --tasks: run the tasks here (local) or submit them as a SLURM array job plus a merge "
                        "job that depends on it (slurm; datatrove's executors)")
    p.add_argument("--slurm-partition", metavar="P", help="--executor slurm: the partition")
    p.add_argument("--slurm-time", default="04:00:00", metavar="T", help="--executor slurm: time limit per task")
    p.add_argument("--slurm-cpus-per-task", type=int, default=4, metavar="N", help="--executor slurm: CPUs per task")
    p.add_argument("--merge", metavar="DIR", help="only write index.json/stats.json over a finished --tasks run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prepare-data output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample", nargs="?", const="data/sample", metavar="DIR",
                   help="build the sample corpus (Python standard library, bytes tokenizer) in DIR "
                        "(default data/sample) and exit")
    syn = p.add_argument_group("synthetic sources (a loss-mask channel: only answers are trained)")
    syn.add_argument("--synthetic", choices=("mqar",), help="write a synthetic task instead of tokenising --input: "
                     "mqar (multi-query associative recall) into --output")
    syn.add_argument("--num-kv-pairs", default="4,8,16,32", metavar="N,N,...",
                     help="mqar: key-value pairs per item, items cycle through them (default 4,8,16,32)")
    syn.add_argument("--seq-len", type=int, default=256, help="mqar: tokens per item, EOS included (default 256)")
    syn.add_argument("--vocab", type=int, default=2048, help="mqar: vocabulary size, PAD and EOS included (default 2048)")
    syn.add_argument("--docs", type=int, default=100000, help="mqar: number of items (default 100000)")
    syn.add_argument("--seed", type=int, default=0, help="mqar: seed (use another one for a validation source)")
    p.set_defaults(func=_prepare)

    d = subparsers.add_parser("data", help="inspect data configs")
    dsub = d.add_subparsers(dest="data_verb", metavar="DATA_VERB", required=True)
    a = dsub.add_parser("audit", help="print, per step and data-parallel rank, what the loader delivers")
    a.add_argument("config", metavar="DATA_CONFIG", help="data config YAML (or a run config with data:)")
    a.add_argument("--dp-size", type=int, default=1)
    a.add_argument("--steps", type=int, default=None, help="steps to print (required unless --validation)")
    a.add_argument("--validation", action="store_true",
                   help="instead: prove the validation sources share no document with the training sources")
    a.add_argument("--state-in", metavar="F", help="resume from this loader state (JSON)")
    a.add_argument("--state-out", metavar="F", help="write the loader state after the last step (JSON)")
    a.add_argument("--num-workers", type=int, default=None, help="override data.num_workers")
    a.set_defaults(func=_audit)


def _prepare(args: argparse.Namespace) -> int:
    from data_pipeline.errors import ConfigError

    if args.sample is not None:
        if args.input or args.output or args.source:
            raise ConfigError("--sample builds its own sources: drop --input/--output/--source")
        from data_pipeline.sample_data import ensure_sample_data

        paths = ensure_sample_data(args.sample, workers=max(args.workers, 1), progress=not args.no_progress)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    if args.synthetic:
        return _synthetic(args)
    if args.merge:
        from data_pipeline.distributed import merge

        stats = merge(args.merge)
        print(f"{args.merge}: {stats['members']} members in {stats['shards']} shards, {stats['tokens']} tokens")
        return 0
    missing = [f"--{n}" for n in ("input", "output", "source") if not getattr(args, n)]
    if missing:
        raise ConfigError(f"prepare-data needs {', '.join(missing)} (or --sample)")
    from data_pipeline.prepare import PrepareOptions, prepare_data

    prepare_data(PrepareOptions(inputs=args.input, output=args.output, source=args.source, tokenizer=args.tokenizer,
                                text_field=args.text_field, workers=args.workers, member_tokens=args.member_tokens,
                                shard_bytes=args.shard_bytes, overwrite=args.overwrite,
                                progress=not args.no_progress, holdout_fraction=args.holdout_fraction,
                                holdout_output=args.holdout_output, tasks=args.tasks, executor=args.executor,
                                slurm={"partition": args.slurm_partition, "time": args.slurm_time,
                                       "cpus_per_task": args.slurm_cpus_per_task}))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from data_pipeline.errors import ConfigError
    from data_pipeline.synthetic import MqarOptions, write_mqar

    if args.input or args.holdout_fraction or args.tasks or args.sample is not None:
        raise ConfigError("--synthetic writes its own items: drop --input/--holdout-fraction/--tasks/--sample")
    if not args.output:
        raise ConfigError("--synthetic needs --output DIR")
    pairs = []
    for item in args.num_kv_pairs.split(","):
        if not item.strip().isdigit():
            raise ConfigError(f"--num-kv-pairs {args.num_kv_pairs!r}: expected comma-separated positive integers")
        pairs.append(int(item))
    opts = MqarOptions(num_kv_pairs=tuple(pairs), seq_len=args.seq_len, vocab=args.vocab, docs=args.docs,
                       seed=args.seed)
    stats = write_mqar(args.output, opts, source=args.source or args.synthetic, overwrite=args.overwrite,
                       progress=not args.no_progress)
    print(f"{args.output}: {stats['documents']} {args.synthetic} items, {stats['tokens']} tokens, "
          f"pairs {stats['synthetic']['items_by_pairs']}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from data_pipeline.audit import run_audit, run_validation_audit
    from data_pipeline.errors import ConfigError

    if args.validation:
        return run_validation_audit(args.config)
    if args.steps is None:
        raise ConfigError("data audit needs --steps N (or --validation)")

    return run_audit(args.config, args.dp_size, args.steps, args.state_in, args.state_out, args.num_workers)
