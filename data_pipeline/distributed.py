"""``prepare-data --tasks N``: tokenisation as a datatrove pipeline, then one merge into a source.

Task ``r`` of ``N`` (datatrove's ``LocalPipelineExecutor``; its completion records let a rerun skip the tasks
that finished) takes input files ``r, r + N, ...`` of the sorted list. Each file is packed into members of its
own, written to shards of its own (``part-<file>-<n>.tar``) and then recorded in ``parts/<file>.json``;
a file whose record exists is skipped, so a rerun after a kill redoes only unfinished files. The merge reads
the records in file order and writes one ``index.json`` and ``stats.json`` over every shard. Members, shards
and index are a function of the inputs and options alone: 1 task and 16 give the same source, byte for byte.
(Member packing restarts at each file here, unlike the single-process path's packing across files.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from data_pipeline.errors import ConfigError, DataError
from data_pipeline.shards import FORMAT, INDEX_NAME, STATS_NAME, ShardWriter, write_json_atomic
from data_pipeline.tokenize_pack import Packer, tokenize_file

log = logging.getLogger(__name__)

PARTS = "parts"
PLAN = "plan.json"


def _part_prefix(file_index: int) -> str:
    return f"part-{file_index:06d}-"


def _record(out: Path, file_index: int) -> Path:
    return out / PARTS / f"{file_index:06d}.json"


def _failure(out: Path, rank: int) -> Path:
    return out / PARTS / f"failed-{rank:05d}.json"


def tokenize_part(plan: dict, out: Path, file_index: int, tok) -> None:
    """Tokenise, pack and write one input file's shards, then its record (the record marks it done)."""
    for old in out.glob(f"{_part_prefix(file_index)}*.tar"):  # a killed attempt's shards
        old.unlink()
    path = plan["files"][file_index]
    _, tokens, doc_ends, text_bytes, empty = tokenize_file(path, plan["text_field"], tok)
    writer = ShardWriter(out, plan["shard_bytes"], tok.vocab_size, prefix=_part_prefix(file_index))
    packer = Packer(writer, plan["member_tokens"])
    packer.add_file(tokens, doc_ends)
    packer.flush()
    index = writer.finish(tok.dtype, tok.eos_id)
    write_json_atomic(_record(out, file_index), {"file": path, "documents": int(doc_ends.size),
                                                 "tokens": int(tokens.size), "text_bytes": text_bytes,
                                                 "empty_documents_skipped": empty, "index": index})


class TokenizeToShards(PipelineStep):
    """The datatrove step: task ``rank`` of ``world_size`` prepares input files rank, rank + world_size, ..."""

    name = "tokenize to shards"
    type = "hybrid-megatron"

    def __init__(self, plan: dict, out: str):
        super().__init__()
        self.plan, self.out = plan, out

    def run(self, data, rank: int = 0, world_size: int = 1):
        from data_pipeline.tokenizer import load_tokenizer

        out = Path(self.out)
        failed = _failure(out, rank)
        failed.unlink(missing_ok=True)
        try:
            tok = load_tokenizer(self.plan["tokenizer"])
            for i in range(rank, len(self.plan["files"]), world_size):
                if not _record(out, i).is_file():
                    tokenize_part(self.plan, out, i, tok)
        except (DataError, ConfigError) as exc:  # a bad input: recorded, named by the driver in one line
            write_json_atomic(failed, {"rank": rank, "world_size": world_size, "error": str(exc)})
        return data or iter(())


class MergeShards(PipelineStep):
    """The datatrove step after every task (a dependent SLURM job): ``merge``."""

    name = "merge shards"
    type = "hybrid-megatron"

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def run(self, data, rank: int = 0, world_size: int = 1):
        merge(self.out)
        return data or iter(())


def _write_plan(opts, files: list[Path]) -> tuple[Path, dict]:
    out = Path(opts.output)
    plan = {"files": [str(f) for f in files], "source": opts.source, "tokenizer": opts.tokenizer,
            "text_field": opts.text_field, "member_tokens": opts.member_tokens, "shard_bytes": opts.shard_bytes}
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    plan_path = out / PARTS / PLAN
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        raise ConfigError(f"{out}: holds an unfinished prepare-data with other inputs or options "
                          "(pass --overwrite to start over)")
    write_json_atomic(plan_path, plan)
    return out, plan


def _clear_failures(out: Path, logging_dir: Path) -> None:
    """A task that recorded a failure runs again: its completion mark goes with the record."""
    for marker in sorted((out / PARTS).glob("failed-*.json")):
        rank = json.loads(marker.read_text())["rank"]
        (logging_dir / "completions" / f"{rank:05d}").unlink(missing_ok=True)
        marker.unlink()


def submit_slurm(opts, files: list[Path], tasks: int, slurm: dict) -> None:
    """Submits the tasks as a SLURM array job and the merge as a job that depends on it (datatrove's
    ``SlurmPipelineExecutor``); returns once both are queued. ``slurm``: partition, time, cpus_per_task."""
    from datatrove.executor import SlurmPipelineExecutor

    out, plan = _write_plan(opts, files)
    logging_dir = out / PARTS / "datatrove"
    _clear_failures(out, logging_dir)
    common = dict(partition=slurm["partition"], time=slurm["time"], cpus_per_task=slurm["cpus_per_task"],
                  slurm_logs_folder=str(out / PARTS / "slurm_logs"), requeue=True)
    tokenize = SlurmPipelineExecutor(pipeline=[TokenizeToShards(plan, str(out))], tasks=tasks,
                                     job_name=f"prepare-{opts.source}", logging_dir=str(logging_dir), **common)
    merge_job = SlurmPipelineExecutor(pipeline=[MergeShards(str(out))], tasks=1, depends=tokenize,
                                      job_name=f"merge-{opts.source}", logging_dir=str(out / PARTS / "merge"), **common)
    merge_job.run()  # submits the array job it depends on first
    log.info("prepare-data %s: submitted %d tasks (job %s) and the merge (job %s); a failed task is listed in "
             "%s/failed-*.json, and rerunning the same command resubmits only what is missing", opts.source, tasks,
             tokenize.job_id, merge_job.job_id, out / PARTS)


def run_local(opts, files: list[Path], tasks: int, workers: int) -> dict:
    """Runs the tasks through datatrove's local executor, then the merge; returns the source's stats."""
    from datatrove.executor import LocalPipelineExecutor

    out, plan = _write_plan(opts, files)
    logging_dir = out / PARTS / "datatrove"
    _clear_failures(out, logging_dir)
    executor = LocalPipelineExecutor(pipeline=[TokenizeToShards(plan, str(out))], tasks=tasks, workers=workers,
                                     logging_dir=str(logging_dir), skip_completed=True, start_method="spawn")
    executor.run()
    failures = [json.loads(m.read_text()) for m in sorted((out / PARTS).glob("failed-*.json"))]
    if failures:
        first = failures[0]
        more = f" ({len(failures) - 1} more failed tasks)" if len(failures) > 1 else ""
        raise DataError(f"task {first['rank']} of {first['world_size']} failed{more}: {first['error']} "
                        "(the finished files are kept: fix the input and rerun)")
    return merge(out)


def merge(out: str | Path) -> dict:
    """One index.json and stats.json over every file's shards, in input order (``prepare-data --merge``)."""
    from data_pipeline.tokenizer import load_tokenizer

    out = Path(out)
    plan_path = out / PARTS / PLAN
    if not plan_path.is_file():
        raise ConfigError(f"--merge {out}: no {PARTS}/{PLAN} (not a distributed prepare-data output)")
    plan = json.loads(plan_path.read_text())
    missing = [i for i in range(len(plan["files"])) if not _record(out, i).is_file()]
    if missing:
        raise DataError(f"{out}: {len(missing)} of {len(plan['files'])} input files are not done, first "
                        f"{plan['files'][missing[0]]} (task {missing[0]} of the run): rerun prepare-data to finish")
    tok = load_tokenizer(plan["tokenizer"])
    shards, members = [], {k: [] for k in ("shard", "name", "offset", "size", "tokens", "docs")}
    totals = {"documents": 0, "tokens": 0, "text_bytes": 0, "empty_documents_skipped": 0}
    for i in range(len(plan["files"])):
        record = json.loads(_record(out, i).read_text())
        part = record["index"]
        base = len(shards)
        shards += part["shards"]
        for key in members:
            members[key] += [s + base for s in part["members"][key]] if key == "shard" else part["members"][key]
        for key in totals:
            totals[key] += record[key]
    if totals["tokens"] == 0:
        raise DataError(f"{out}: no non-empty documents in the inputs")
    index = {"format": FORMAT, "dtype": tok.dtype.newbyteorder("<").str, "eos_id": tok.eos_id,
             "shards": shards, "members": members}
    stats = {"source": plan["source"], **totals, "input_files": len(plan["files"]), "members": len(members["name"]),
             "shards": len(shards), "tokenizer": tok.describe(), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
             "dtype": index["dtype"], "member_tokens": plan["member_tokens"], "tasks_layout": "one member set per input file"}
    write_json_atomic(out / STATS_NAME, stats)
    write_json_atomic(out / INDEX_NAME, index)  # last: its presence marks a complete output
    log.info("prepare-data %s: merged %d files into %d members in %d shards (%d tokens)", plan["source"],
             len(plan["files"]), stats["members"], stats["shards"], stats["tokens"])
    return stats
