"""``prepare-data``: tokenise corpus files and pack them into token shards (see ``shards.py``).

Files are expanded from the globs, sorted and deduplicated, tokenised in parallel (one task per file,
``--workers`` spawned processes, results consumed in file order) and packed in the main process into
members of whole documents: a member closes at the first document boundary at or past
``member_tokens`` (default 262,144; at least 65,536), so only a source's last member can be smaller.
The output depends only on the inputs and options, never on the number of workers.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import ConfigError, DataError
from data_pipeline.shards import INDEX_NAME, STATS_NAME, ShardWriter, write_json_atomic, written_files
from data_pipeline.tokenize_pack import Packer, tokenize_file

log = logging.getLogger(__name__)

MIN_MEMBER_TOKENS = 65536

_worker_tok = None
_worker_progress = None  # a shared counter of input bytes read, for the parent's progress bar


@dataclass(kw_only=True, slots=True)
class PrepareOptions:
    inputs: list[str]
    """Globs (or paths) of corpus files."""
    output: str
    """Output directory (created; must be empty unless ``overwrite``)."""
    source: str
    """Source name recorded in stats.json."""
    tokenizer: str = "bytes"
    """``bytes`` or a local Hugging Face tokenizer directory."""
    text_field: str = "text"
    workers: int = 1
    member_tokens: int = 262144
    shard_bytes: int = 256 * 1024 * 1024
    overwrite: bool = False
    progress: bool = True
    holdout_fraction: float = 0.0
    """Share of documents (chosen by content, ``holdout.py``) written to ``holdout_output`` instead."""
    holdout_output: str | None = None
    """The validation source directory (with ``holdout_fraction`` > 0)."""
    tasks: int = 0
    """0: one process with a worker pool; N >= 1: N datatrove tasks (``distributed.py``), resumable."""
    executor: str = "local"
    """With ``tasks``: ``local`` runs them here, ``slurm`` submits them (and the merge) to SLURM."""
    slurm: dict | None = None
    """``executor=slurm``: ``partition``, ``time``, ``cpus_per_task``."""


def expand_inputs(patterns: list[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        matched = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise ConfigError(f"--input {pattern}: matches no file")
        files.update(p.resolve() for p in matched)
    return sorted(files)


def _init_worker(spec: str, parent_pid: int, progress) -> None:
    global _worker_tok, _worker_progress
    _die_with_parent(parent_pid)
    from data_pipeline.tokenizer import load_tokenizer

    _worker_tok = load_tokenizer(spec)
    _worker_progress = progress


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends this worker SIGKILL when the process that started it ends, however it ends
    (a SIGTERM or SIGKILL to prepare-data must not leave tokenizers running with gigabytes of memory)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent was already gone before the request took effect
        os._exit(1)


_unreported = 0


def _report(n: int) -> None:
    """Adds read bytes to the shared counter in steps of 4 MB (one lock per step, not per read)."""
    global _unreported
    _unreported += n
    if _unreported >= 4 << 20:
        with _worker_progress.get_lock():
            _worker_progress.value += _unreported
        _unreported = 0


def _tokenize_file(args: tuple[str, str]) -> tuple[str, np.ndarray, np.ndarray, int, int]:
    """Pool task: ``tokenize_file`` with this worker's tokenizer and progress counter."""
    path, text_field = args
    return tokenize_file(path, text_field, _worker_tok, _report if _worker_progress is not None else None)


def prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--output {out}: not empty (pass --overwrite to replace a previous prepare-data)")
        for f in out.iterdir():
            if f in written_files(out):
                f.unlink()
            elif f.name == "parts" and f.is_dir():  # a distributed run's records (distributed.py)
                import shutil

                shutil.rmtree(f)
            else:
                log.warning("--overwrite keeps %s (not a prepare-data file)", f)
    out.mkdir(parents=True, exist_ok=True)


def prepare_data(opts: PrepareOptions) -> dict:
    """Run ``prepare-data``; returns the stats written to ``stats.json``."""
    from data_pipeline.readers import file_kind
    from data_pipeline.tokenizer import load_tokenizer

    if opts.member_tokens < MIN_MEMBER_TOKENS:
        raise ConfigError(f"--member-tokens {opts.member_tokens}: must be at least {MIN_MEMBER_TOKENS}")
    if opts.workers < 1:
        raise ConfigError(f"--workers {opts.workers}: must be at least 1")
    if opts.shard_bytes < 1:
        raise ConfigError(f"--shard-bytes {opts.shard_bytes}: must be at least 1")
    if not 0 <= opts.holdout_fraction < 1:
        raise ConfigError(f"--holdout-fraction {opts.holdout_fraction}: must be in [0, 1)")
    if (opts.holdout_fraction > 0) != bool(opts.holdout_output):
        raise ConfigError("--holdout-fraction and --holdout-output go together (a fraction > 0 and a directory)")
    if opts.holdout_output and Path(opts.holdout_output).resolve() == Path(opts.output).resolve():
        raise ConfigError("--holdout-output must differ from --output")
    if opts.tasks < 0:
        raise ConfigError(f"--tasks {opts.tasks}: must be >= 0 (0: one process)")
    if opts.executor not in ("local", "slurm"):
        raise ConfigError(f"--executor {opts.executor}: must be local or slurm")
    if opts.executor == "slurm" and not opts.tasks:
        raise ConfigError("--executor slurm needs --tasks N")
    if opts.executor == "slurm" and not (opts.slurm or {}).get("partition"):
        raise ConfigError("--executor slurm needs --slurm-partition")
    if opts.tasks and opts.holdout_fraction:
        raise ConfigError("--holdout-fraction is not available with --tasks yet: prepare the held-out split "
                          "in one process")
    tok = load_tokenizer(opts.tokenizer)  # validates the tokenizer before any work
    files = expand_inputs(opts.inputs)
    for f in files:
        file_kind(f)
    out = Path(opts.output)
    if opts.tasks:
        from data_pipeline.distributed import PARTS, PLAN, run_local, submit_slurm

        if not (out / PARTS / PLAN).is_file() or opts.overwrite:  # else: resume the unfinished run
            prepare_output(out, opts.overwrite)
        if opts.executor == "slurm":
            submit_slurm(opts, files, opts.tasks, opts.slurm)
            return {}
        return run_local(opts, files, opts.tasks, opts.workers)
    outs = [out] + ([Path(opts.holdout_output)] if opts.holdout_output else [])
    for path in outs:
        prepare_output(path, opts.overwrite)
    log.info("prepare-data %s: %d files -> %s (tokenizer %s, %d workers)", opts.source, len(files),
             " + ".join(map(str, outs)), opts.tokenizer, opts.workers)
    t0 = time.perf_counter()
    try:
        with _term_as_exit():
            stats = _write_source(opts, files, outs, tok)
    except BaseException:
        for path in outs:
            for f in written_files(path):  # nothing half-written stays behind looking like a source
                f.unlink()
        raise
    seconds = time.perf_counter() - t0
    log.info("prepare-data %s: %d docs, %d tokens, %d members in %d shards, %.1f s (%.1f MB/s text, %.0f tok/s)",
             opts.source, stats["documents"], stats["tokens"], stats["members"], stats["shards"], seconds,
             stats["text_bytes"] / 1e6 / seconds, stats["tokens"] / seconds)
    if stats["empty_documents_skipped"]:
        log.warning("prepare-data %s: skipped %d empty documents", opts.source, stats["empty_documents_skipped"])
    return stats


@contextlib.contextmanager
def _term_as_exit():
    """SIGTERM ends prepare-data like Ctrl-C: cleanup runs, the pool's workers go with it (exit 143)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Output:
    """One source directory being written: shard writer, packer and counters."""

    def __init__(self, path: Path, opts: PrepareOptions, tok):
        self.path = path
        self.writer = ShardWriter(path, opts.shard_bytes, tok.vocab_size)
        self.packer = Packer(self.writer, opts.member_tokens)
        self.docs = self.tokens = 0

    def add(self, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        self.packer.add_file(tokens, doc_ends)
        self.docs += doc_ends.size
        self.tokens += tokens.size


def _write_source(opts: PrepareOptions, files: list[Path], outs: list[Path], tok) -> dict:
    """Tokenise in the worker pool, pack and write shards (held-out documents to the second output), then
    stats.json and index.json (last) of each output."""
    import multiprocessing
    import threading

    from tqdm import tqdm

    from data_pipeline.holdout import split_documents

    ctx = multiprocessing.get_context("spawn")
    outputs = [_Output(path, opts, tok) for path in outs]
    text_bytes = empty = 0
    tasks = [(str(f), opts.text_field) for f in files]
    total_in = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_in, unit="B", unit_scale=True, desc=f"prepare {opts.source}", disable=not opts.progress)
    read = ctx.Value("q", 0)
    done = threading.Event()

    def follow() -> None:  # input bytes the workers have read so far, twice a second
        while not done.wait(0.5):
            bar.update(read.value - bar.n)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    try:
        # multiprocessing's Pool, not concurrent.futures: leaving the block on an error or a signal terminates
        # the workers at once instead of waiting for the files they are tokenising
        with ctx.Pool(opts.workers, initializer=_init_worker, initargs=(opts.tokenizer, os.getpid(), read)) as pool:
            for _path, toks, doc_ends, nbytes, nempty in pool.imap(_tokenize_file, tasks, chunksize=1):
                if opts.holdout_fraction:
                    train, held = split_documents(toks, doc_ends, opts.holdout_fraction)
                    outputs[0].add(*train)
                    outputs[1].add(*held)
                else:
                    outputs[0].add(toks, doc_ends)
                text_bytes += nbytes
                empty += nempty
    finally:
        done.set()
        watcher.join()
    bar.update(total_in - bar.n)
    bar.close()
    docs, tokens = sum(o.docs for o in outputs), sum(o.tokens for o in outputs)
    if tokens == 0:
        raise DataError(f"--input {' '.join(opts.inputs)}: no non-empty documents")
    if opts.holdout_fraction and not outputs[1].docs:
        raise DataError(f"--holdout-fraction {opts.holdout_fraction} held out none of the {docs} documents: raise it")
    if opts.holdout_fraction and not outputs[0].docs:
        raise DataError(f"--holdout-fraction {opts.holdout_fraction} held out all {docs} documents")
    common = {"source": opts.source, "empty_documents_skipped": empty, "text_bytes": text_bytes,
              "input_files": len(files), "input_bytes": total_in, "tokenizer": tok.describe(),
              "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "member_tokens": opts.member_tokens}
    for i, out in enumerate(outputs):
        out.packer.flush()
        index = out.writer.finish(tok.dtype, tok.eos_id)
        out.stats = {**common, "documents": out.docs, "tokens": out.tokens, "members": len(index["members"]["name"]),
                     "shards": len(index["shards"]), "dtype": index["dtype"]}
        if opts.holdout_fraction:
            from data_pipeline.holdout import RULE

            out.stats["holdout"] = {"split": "validation" if i else "train", "fraction": opts.holdout_fraction,
                                    "rule": RULE, "other_side": str(outputs[1 - i].path.resolve())}
        write_json_atomic(out.path / STATS_NAME, out.stats)
        write_json_atomic(out.path / INDEX_NAME, index)  # last: its presence marks a complete output
    stats = outputs[0].stats
    return stats
