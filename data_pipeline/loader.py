"""The stateful, deterministic per-data-parallel-rank loader the training loop consumes.

``loader = build_loader(config, dp_rank, dp_size)`` validates and opens every source; ``next(loader)``
returns the :class:`StepBatch` of this rank for the next optimizer step and raises ``StopIteration``
after the last step of the last phase. The global batch of every step is planned by
:class:`~data_pipeline.mixture.MixturePlanner` (metadata only, identical on all ranks); this rank
then decompresses only the members its own samples touch.

State. ``state_dict()`` describes the position right after the last *delivered* batch (never a
prefetched one, never one whose reading failed) and is independent of ``dp_rank``/``dp_size``, so a
checkpoint stores it once and a run may resume at another data-parallel size. It is small and
JSON-serialisable and carries a fingerprint of the data config and of each source's index;
``load_state_dict`` refuses (ConfigError) a state from a different config, seed or data.

Workers. With ``num_workers > 0`` spawned processes prefetch and decompress the next
``2 * num_workers`` steps; results are consumed in step order, so workers never change the order.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError
from data_pipeline.mixture import MixturePlanner, StepPlan
from data_pipeline.packing import build_arrays, sample_hash, take_dropped
from data_pipeline.schedule import build_schedule
from data_pipeline.shards import SourceIndex
from data_pipeline.streams import SourceStream

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class StepBatch:
    """One optimizer step's data for one data-parallel rank (``N`` = n_local sequences, ``L`` = seq_len)."""

    step: int
    phase: str
    seq_len: int
    input_ids: np.ndarray  # int64 [N, L]
    labels: np.ndarray  # int64 [N, L], next-token targets
    loss_mask: np.ndarray  # float32 [N, L]
    position_ids: np.ndarray  # int64 [N, L], restart at documents when the packing switch is on
    seq_idx: np.ndarray  # int32 [N, L], document index within the row
    sources: list[str]  # per sequence
    hashes: list[str]  # per sequence, identity of its L+1 tokens
    tokens_by_source: dict[str, int]  # input tokens of this rank by source
    replay: list[bool] = field(default_factory=list)  # per sequence: drawn by the phase's replay share
    dropped_tokens: int = 0  # tokens the rows' document padding pushed out (data.document_multiple), this rank

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.size)


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_id: int
    tokenizer: dict


def open_sources(config: DataConfig) -> dict[str, SourceIndex]:
    """Open every training source's index; ConfigError for a missing directory, DataError for damaged data."""
    return _open(config.source_paths(), config.sources, "data.sources")


def open_validation_sources(config: DataConfig) -> dict[str, SourceIndex]:
    """The same for ``data.validation.sources``."""
    v = config.validation
    return _open(v.source_paths(), v.sources, "data.validation.sources")


def _open(locations: dict, given: dict[str, str], section: str) -> dict[str, SourceIndex]:
    out = {}
    for name, location in locations.items():
        if not location.is_dir():
            raise ConfigError(f"{section}.{name}={given[name]!r}: directory {location} does not exist")
        out[name] = SourceIndex.open(str(location), name)
    return out


def tokenizer_info(indexes: dict[str, SourceIndex]) -> TokenizerInfo:
    """The tokenizer all sources share; ConfigError if two sources were tokenised differently."""
    first_name, info = None, None
    for name, ix in sorted(indexes.items()):
        tok = ix.stats["tokenizer"]
        cur = TokenizerInfo(int(ix.stats["vocab_size"]), int(ix.stats["eos_id"]), tok)
        if info is None:
            first_name, info = name, cur
        elif (cur.vocab_size, cur.eos_id, tok["fingerprint"]) != (info.vocab_size, info.eos_id,
                                                                   info.tokenizer["fingerprint"]):
            raise ConfigError(f"data.sources: {first_name} and {name} use different tokenizers "
                              f"({info.tokenizer['kind']} vocab {info.vocab_size} vs {tok['kind']} vocab "
                              f"{cur.vocab_size}); re-run prepare-data with one tokenizer")
    return info


def config_vocab_size(config: DataConfig) -> int:
    """Vocabulary size shared by the config's sources (from their stats.json)."""
    return tokenizer_info(open_sources(config)).vocab_size


class _Materializer:
    """Reads and packs this rank's samples of a step (runs inline or in a worker process)."""

    def __init__(self, paths: dict[str, str], seed: int, eos_id: int, reset: bool, eod_mask_loss: bool,
                 document_multiple: int = 1):
        self.streams = {n: SourceStream(n, SourceIndex.open(p, n), seed) for n, p in paths.items()}
        self.eos_id, self.reset, self.eod_mask_loss = eos_id, reset, eod_mask_loss
        self.document_multiple = document_multiple
        self.masked = any(s.has_masks for s in self.streams.values())

    def run(self, seq_len: int, sources: list[str], starts: list[int]) -> dict:
        windows = np.empty((len(starts), seq_len + 1), np.int64)
        targets = np.empty_like(windows, dtype=np.uint8) if self.masked else None
        for row, (src, start) in enumerate(zip(sources, starts)):
            self.streams[src].read_into(windows[row], start, None if targets is None else targets[row])
        arrays = build_arrays(windows, self.eos_id, self.reset, self.eod_mask_loss, targets, self.document_multiple)
        arrays["hashes"] = [sample_hash(w) for w in windows]
        return arrays

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


_worker_materializer: _Materializer | None = None


def _worker_init(*args) -> None:
    global _worker_materializer
    _worker_materializer = _Materializer(*args)


def _worker_run(seq_len: int, sources: list[str], starts: list[int]) -> dict:
    return _worker_materializer.run(seq_len, sources, starts)


class TokenLoader:
    """Iterator of :class:`StepBatch` for one data-parallel rank; see the module docstring."""

    def __init__(self, config: DataConfig, dp_rank: int, dp_size: int):
        config.check_dp_size(dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank {dp_rank}: must be in [0, {dp_size})")
        self.config, self.dp_rank, self.dp_size = config, dp_rank, dp_size
        indexes = open_sources(config)
        info = tokenizer_info(indexes)
        self.vocab_size, self.eos_id = info.vocab_size, info.eos_id
        self.schedule = build_schedule(config)
        self.planner = MixturePlanner(config, self.schedule, {n: ix.num_tokens for n, ix in indexes.items()},
                                      log_epochs=dp_rank == 0)
        digest = hashlib.sha256(config.fingerprint().encode())
        for name, ix in sorted(indexes.items()):
            digest.update(f"{name}={ix.fingerprint};".encode())
        self.fingerprint = digest.hexdigest()[:16]
        self._mat_args = ({n: str(ix.root) for n, ix in indexes.items()}, config.seed, self.eos_id,
                          config.reset_at_document_boundaries, config.eod_mask_loss, config.document_multiple)
        self._inline: _Materializer | None = None
        self._pool = None
        self._pending: deque = deque()  # (plan, state after, future) in step order
        self._state = self.planner.initial_state()

    # ---- iteration ------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def __iter__(self) -> TokenLoader:
        return self

    def _local(self, plan: StepPlan) -> tuple[list[str], list[int], list[bool]]:
        r = plan.rank_slice(self.dp_rank, self.dp_size)
        return list(plan.sources[r.start:r.stop]), list(plan.starts[r.start:r.stop]), list(plan.replay[r.start:r.stop])

    def _submit_ahead(self) -> None:
        depth = 2 * self.config.num_workers
        state = self._pending[-1][1] if self._pending else self._state
        while len(self._pending) < depth and state["step"] < self.total_steps:
            plan, after = self.planner.plan(state)
            sources, starts, _ = self._local(plan)
            self._pending.append((plan, after, self._pool.submit(_worker_run, plan.seq_len, sources, starts)))
            state = after

    def __next__(self) -> StepBatch:
        if self._state["step"] >= self.total_steps:
            raise StopIteration
        if self.config.num_workers:
            if self._pool is None:
                from concurrent.futures import ProcessPoolExecutor
                from multiprocessing import get_context

                self._pool = ProcessPoolExecutor(self.config.num_workers, mp_context=get_context("spawn"),
                                                 initializer=_worker_init, initargs=self._mat_args)
            self._submit_ahead()
            plan, after, future = self._pending.popleft()
            try:
                arrays = future.result()
            except BaseException:
                self._drop_pending()  # state stays at the last delivered step
                raise
        else:
            if self._inline is None:
                self._inline = _Materializer(*self._mat_args)
            plan, after = self.planner.plan(self._state)
            sources, starts, _ = self._local(plan)
            arrays = self._inline.run(plan.seq_len, sources, starts)
        batch = self._to_batch(plan, arrays)
        self._state = after  # only now: the batch is complete and handed over
        return batch

    def _to_batch(self, plan: StepPlan, arrays: dict) -> StepBatch:
        sources, _, replay = self._local(plan)
        by_source: dict[str, int] = {}
        for s in sources:
            by_source[s] = by_source.get(s, 0) + plan.seq_len
        return StepBatch(step=plan.step, phase=plan.phase, seq_len=plan.seq_len, input_ids=arrays["input_ids"],
                         labels=arrays["labels"], loss_mask=arrays["loss_mask"], position_ids=arrays["position_ids"],
                         seq_idx=arrays["seq_idx"], sources=sources, hashes=arrays["hashes"],
                         tokens_by_source=dict(sorted(by_source.items())), replay=replay,
                         dropped_tokens=take_dropped(arrays))

    def _drop_pending(self) -> None:
        while self._pending:
            self._pending.popleft()[2].cancel()

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position after the last delivered batch (JSON-serialisable, same on every rank)."""
        s = self._state
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "step": s["step"],
                "positions": dict(s["positions"]), "phase_samples": s["phase_samples"],
                "allocated": list(s["allocated"])}

    def load_state_dict(self, state: dict) -> None:
        """Resume so that the next batch is exactly the one that followed ``state``."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state: unknown format (expected version {STATE_VERSION})")
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"loader state was made for data fingerprint {state.get('fingerprint')}, this "
                              f"data config/seed/source data gives {self.fingerprint}: refusing to resume")
        step = int(state["step"])
        if not 0 <= step <= self.total_steps or set(state["positions"]) != set(self._state["positions"]):
            raise ConfigError(f"loader state: step {step} or sources do not fit this data config")
        self._drop_pending()
        self._state = {"step": step, "positions": {k: int(v) for k, v in state["positions"].items()},
                       "phase_samples": int(state["phase_samples"]),
                       "allocated": [int(a) for a in state["allocated"]]}

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def build_loader(config: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> TokenLoader:
    """Validate the sources, open their indexes and return this rank's loader."""
    return TokenLoader(config, dp_rank, dp_size)


__all__ = ["StepBatch", "TokenLoader", "TokenizerInfo", "build_loader", "config_vocab_size", "open_sources",
           "tokenizer_info"]
