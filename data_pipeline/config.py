"""The data config: sources, phases (pretrain mix, anneal with replay), curriculum, packing switches.

This is the user-facing YAML format (``configs/data/*.yaml``); a run config embeds the same mapping as
its ``data:`` section. :meth:`DataConfig.from_dict` is the single entry point (the trainer applies
dotlist overrides to the raw dict first) and raises :class:`ConfigError` naming the field path, e.g.
``data.phases[1].replay=1.2: must be in [0, 1)``.

Example::

    seed: 1234
    global_batch_tokens: 65536       # tokens per optimizer step across all data-parallel ranks
    seq_len: 4096                    # used when there is no curriculum
    sources: {web: /data/web, code: /data/code, hq: /data/hq}   # name -> prepare-data output dir
    phases:
      - {name: pretrain, tokens: 50000000, weights: {web: 0.7, code: 0.3}}
      - {name: anneal, tokens: 6000000, weights: {hq: 1.0}, replay: 0.6}
    curriculum: {min_seq_len: 256, max_seq_len: 4096, schedule: fixed_linear, total_tokens: 10000000, step: 64}

Run length: a step belongs to one phase; a phase takes steps until the tokens it delivered reach its
``tokens`` (so its last step may overshoot by less than one step). Tokens per step are
``num_sequences * seq_len`` where ``num_sequences = global_batch_tokens // seq_len`` rounded down to a
multiple of ``batch_size_multiple``: progress is always counted in tokens actually delivered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.errors import ConfigError
from data_pipeline.storage import Location

SCHEDULES = ("fixed_linear", "fixed_root", "fixed_discrete")


def _fail(path: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{path}={value!r}: {why}" if value is not _MISSING else f"{path}: {why}")


_MISSING = object()


def _take(d: dict, key: str, path: str, kind: type | tuple, default: Any = _MISSING) -> Any:
    """Read ``d[key]`` checking its type; bools are never accepted where numbers are expected."""
    if key not in d:
        if default is _MISSING:
            raise _fail(f"{path}.{key}", _MISSING, "is required")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _fail(f"{path}.{key}", value, f"must be {names}")
    return value


def _check_keys(d: Any, allowed: set[str], path: str) -> None:
    if not isinstance(d, dict):
        raise _fail(path, d, "must be a mapping")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise _fail(f"{path}.{unknown[0]}", _MISSING, f"unknown field (allowed: {', '.join(sorted(allowed))})")


@dataclass(kw_only=True, slots=True)
class PhaseConfig:
    """One phase of the run, measured in tokens."""

    name: str
    """Label shown in logs and in every StepBatch (`pretrain`, `anneal`, ...); unique within the run."""
    tokens: int
    """Tokens this phase delivers (its last step may overshoot by less than one step)."""
    weights: dict[str, float]
    """Source name -> positive weight; normalised to sum to one."""
    replay: float = 0.0
    """Share in [0, 1) of this phase's samples drawn from the previous phase's effective mixture,
    continuing that mixture's source streams (nothing the earlier phase read is re-read before a
    source's epoch wraps). Must be 0 in the first phase."""

    @classmethod
    def from_dict(cls, d: dict, path: str) -> PhaseConfig:
        _check_keys(d, {"name", "tokens", "weights", "replay"}, path)
        name = _take(d, "name", path, str)
        tokens = _take(d, "tokens", path, int)
        if tokens <= 0:
            raise _fail(f"{path}.tokens", tokens, "a phase needs a positive number of tokens")
        weights = _take(d, "weights", path, dict)
        if not weights:
            raise _fail(f"{path}.weights", weights, "needs at least one source")
        clean: dict[str, float] = {}
        for src, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf"):
                raise _fail(f"{path}.weights.{src}", w, "must be a positive finite number")
            clean[str(src)] = float(w)
        replay = float(_take(d, "replay", path, (int, float), 0.0))
        if not 0.0 <= replay < 1.0:
            raise _fail(f"{path}.replay", replay, "must be in [0, 1)")
        return cls(name=name, tokens=tokens, weights=clean, replay=replay)

    def normalized_weights(self) -> dict[str, float]:
        """Weights divided by their sum, in the order written."""
        total = sum(self.weights.values())
        return {k: v / total for k, v in self.weights.items()}


@dataclass(kw_only=True, slots=True)
class CurriculumConfig:
    """Sequence-length curriculum evaluated by DeepSpeed's ``CurriculumScheduler``, counted in tokens.

    The scheduler's "global step" argument is the number of tokens delivered before the step, so
    ``total_tokens`` (and ``max_tokens`` for ``fixed_discrete``) are in tokens.
    """

    min_seq_len: int
    """Sequence length at the start of training."""
    max_seq_len: int
    """Sequence length once the curriculum is over."""
    schedule: str = "fixed_linear"
    """One of ``fixed_linear``, ``fixed_root``, ``fixed_discrete`` (DeepSpeed's schedule types)."""
    total_tokens: int = 0
    """Tokens over which ``fixed_linear``/``fixed_root`` grow from min to max."""
    step: int = 64
    """Sequence lengths are multiples of this (DeepSpeed's ``difficulty_step``; a multiple of 8)."""
    root_degree: int = 2
    """Root degree for ``fixed_root``."""
    seq_lens: list[int] = field(default_factory=list)
    """``fixed_discrete``: the sequence lengths, in order."""
    max_tokens: list[int] = field(default_factory=list)
    """``fixed_discrete``: tokens up to which each length but the last is used (one fewer entry)."""

    @classmethod
    def from_dict(cls, d: dict, path: str) -> CurriculumConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        _check_keys(d, names, path)
        kw: dict[str, Any] = {}
        for key in ("min_seq_len", "max_seq_len"):
            kw[key] = _take(d, key, path, int)
            if kw[key] <= 0:
                raise _fail(f"{path}.{key}", kw[key], "must be positive")
        kw["schedule"] = _take(d, "schedule", path, str, "fixed_linear")
        if kw["schedule"] not in SCHEDULES:
            raise _fail(f"{path}.schedule", kw["schedule"], f"must be one of {', '.join(SCHEDULES)}")
        for key, default in (("total_tokens", 0), ("step", 64), ("root_degree", 2)):
            kw[key] = _take(d, key, path, int, default)
        for key in ("seq_lens", "max_tokens"):
            values = _take(d, key, path, list, [])
            if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise _fail(f"{path}.{key}", values, "must be a list of positive integers")
            kw[key] = list(values)
        cfg = cls(**kw)
        cfg._validate(path)
        return cfg

    def _validate(self, path: str) -> None:
        if self.min_seq_len > self.max_seq_len:
            raise _fail(f"{path}.min_seq_len", self.min_seq_len, f"must be <= max_seq_len ({self.max_seq_len})")
        if self.step <= 0 or self.step % 8:
            raise _fail(f"{path}.step", self.step, "must be a positive multiple of 8")
        if self.schedule in ("fixed_linear", "fixed_root") and self.total_tokens <= 0:
            raise _fail(f"{path}.total_tokens", self.total_tokens, f"must be positive for {self.schedule}")
        if self.schedule == "fixed_root" and self.root_degree <= 0:
            raise _fail(f"{path}.root_degree", self.root_degree, "must be positive")
        if self.schedule == "fixed_discrete":
            if not self.seq_lens or len(self.max_tokens) != len(self.seq_lens) - 1:
                raise _fail(f"{path}.max_tokens", self.max_tokens, "needs exactly len(seq_lens) - 1 entries")
            if any(not self.min_seq_len <= s <= self.max_seq_len for s in self.seq_lens):
                raise _fail(f"{path}.seq_lens", self.seq_lens, "must lie within [min_seq_len, max_seq_len]")
            if self.max_tokens != sorted(self.max_tokens):
                raise _fail(f"{path}.max_tokens", self.max_tokens, "must be increasing")


def _take_sources(d: dict, path: str, empty: str) -> dict:
    """The ``sources`` mapping of a section: name -> a non-empty directory path or URL."""
    sources = _take(d, "sources", path, dict)
    if not sources:
        raise _fail(f"{path}.sources", sources, empty)
    for name, src in sources.items():
        if not isinstance(src, str) or not src:
            raise _fail(f"{path}.sources.{name}", src, "must be a directory path")
    return sources


@dataclass(kw_only=True, slots=True)
class ValidationConfig:
    """Held-out data the run evaluates on (``prepare-data --holdout-fraction/--holdout-output`` makes it)."""

    sources: dict[str, str]
    """Validation source name -> directory; relative paths resolve against the cwd."""
    tokens: int = 1 << 20
    """Tokens per evaluation, split evenly over the sources (fewer where a source is smaller)."""
    seq_len: int | None = None
    """Sequence length of the validation windows; None: the training's longest."""

    @classmethod
    def from_dict(cls, d: dict, path: str) -> ValidationConfig:
        if not isinstance(d, dict):
            raise _fail(path, d, "must be a mapping")
        _check_keys(d, {"sources", "tokens", "seq_len"}, path)
        sources = _take_sources(d, path, "needs at least one validation source")
        tokens = _take(d, "tokens", path, int, 1 << 20)
        if tokens <= 0:
            raise _fail(f"{path}.tokens", tokens, "must be positive")
        seq_len = d.get("seq_len")
        if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0):
            raise _fail(f"{path}.seq_len", seq_len, "must be a positive int or null")
        return cls(sources={str(k): v for k, v in sources.items()}, tokens=tokens, seq_len=seq_len)

    def source_paths(self) -> dict[str, Location]:
        return {name: Location(p) for name, p in self.sources.items()}


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Everything that determines which tokens each optimizer step sees.

    The sample order is a function of this config (minus ``num_workers``), the data on disk and the
    global position only: it does not depend on the data-parallel size or the number of workers.
    """

    seed: int
    """Seeds the per-epoch member permutations and the in-batch shuffles."""
    global_batch_tokens: int
    """Target tokens per optimizer step across all data-parallel ranks."""
    seq_len: int
    """Sequence length when there is no curriculum."""
    sources: dict[str, str]
    """Source name -> directory written by ``prepare-data`` (relative paths resolve against the cwd) or an
    fsspec URL of one (``s3://``, ``gs://``, ``https://``; ``simplecache::`` in front caches locally)."""
    phases: list[PhaseConfig]
    """Phases in order; the run is their concatenation."""
    curriculum: CurriculumConfig | None = None
    """Optional sequence-length curriculum (constant tokens per step)."""
    reset_at_document_boundaries: bool = True
    """Packing switch: when on, ``position_ids`` restart at 0 and ``seq_idx`` increments after every EOS
    so that attention (cu_seqlens) and the Mamba state stop at document boundaries; when off,
    ``position_ids`` is ``arange`` and ``seq_idx`` is all zeros (documents attend across EOS)."""
    eod_mask_loss: bool = False
    """Zero the loss where the input token is EOS (Megatron's ``eod_mask_loss``)."""
    document_multiple: int = 1
    """With packed documents: each document of a row padded to a multiple of this many tokens (pad tokens are not
    trained), what context parallelism's per-document split needs (2 x CP divides it). A row keeps its length, so
    the padding pushes up to ``document_multiple - 1`` tokens per document boundary out of the row's end: they are
    not trained, and the training log counts them. 1: no padding."""
    num_workers: int = 0
    """Loader processes that prefetch/decompress steps (0 = inline). Never changes the order."""
    batch_size_multiple: int = 8
    """Sequences per step are rounded down to a multiple of this; every data-parallel size must divide it."""
    validation: ValidationConfig | None = None
    """Held-out sources for validation loss (``train.eval_interval``); never read for training."""

    @classmethod
    def from_dict(cls, d: dict, path: str = "data") -> DataConfig:
        """Validate a raw mapping (after overrides) and build the config; errors name the field path."""
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        seed = _take(d, "seed", path, int)
        gbt = _take(d, "global_batch_tokens", path, int)
        if gbt <= 0:
            raise _fail(f"{path}.global_batch_tokens", gbt, "must be positive")
        seq_len = _take(d, "seq_len", path, int)
        if seq_len <= 0:
            raise _fail(f"{path}.seq_len", seq_len, "must be positive")
        sources = _take_sources(d, path, "needs at least one source")
        raw_phases = _take(d, "phases", path, list)
        if not raw_phases:
            raise _fail(f"{path}.phases", raw_phases, "needs at least one phase")
        phases = [PhaseConfig.from_dict(p, f"{path}.phases[{i}]") for i, p in enumerate(raw_phases)]
        seen: set[str] = set()
        for i, phase in enumerate(phases):
            if phase.name in seen:
                raise _fail(f"{path}.phases[{i}].name", phase.name, "duplicate phase name")
            seen.add(phase.name)
            for src in phase.weights:
                if src not in sources:
                    raise _fail(f"{path}.phases[{i}].weights.{src}", _MISSING,
                                f"unknown source (sources: {', '.join(sorted(sources))})")
        if phases[0].replay:
            raise _fail(f"{path}.phases[0].replay", phases[0].replay, "the first phase has nothing to replay")
        raw_cur = d.get("curriculum")
        curriculum = None if raw_cur is None else CurriculumConfig.from_dict(raw_cur, f"{path}.curriculum")
        flags = {k: _take(d, k, path, bool, default) for k, default in
                 (("reset_at_document_boundaries", True), ("eod_mask_loss", False))}
        multiple = _take(d, "document_multiple", path, int, 1)
        if multiple <= 0:
            raise _fail(f"{path}.document_multiple", multiple, "must be positive")
        if multiple > 1 and not flags["reset_at_document_boundaries"]:
            raise _fail(f"{path}.document_multiple", multiple, "pads packed documents: needs "
                        f"{path}.reset_at_document_boundaries=true")
        num_workers = _take(d, "num_workers", path, int, 0)
        if num_workers < 0:
            raise _fail(f"{path}.num_workers", num_workers, "must be >= 0")
        bsm = _take(d, "batch_size_multiple", path, int, 8)
        if bsm <= 0:
            raise _fail(f"{path}.batch_size_multiple", bsm, "must be positive")
        longest = curriculum.max_seq_len if curriculum else seq_len
        if gbt // longest < bsm:
            raise _fail(f"{path}.global_batch_tokens", gbt,
                        f"holds fewer than batch_size_multiple={bsm} sequences of length {longest}")
        raw_val = d.get("validation")
        validation = None if raw_val is None else ValidationConfig.from_dict(raw_val, f"{path}.validation")
        if multiple > 1:
            _check_lengths_hold_padded_documents(path, multiple, seq_len, curriculum, validation)
        if validation is not None:
            clash = sorted(set(validation.sources) & set(sources))
            if clash:
                raise _fail(f"{path}.validation.sources.{clash[0]}", validation.sources[clash[0]],
                            "a validation source needs a name of its own (it is also a training source)")
            shared = sorted({str(Location(p)) for p in validation.sources.values()}
                            & {str(Location(p)) for p in sources.values()})
            if shared:
                raise _fail(f"{path}.validation.sources", shared[0], "is also a training source directory")
        return cls(seed=seed, global_batch_tokens=gbt, seq_len=seq_len,
                   sources={str(k): v for k, v in sources.items()}, phases=phases, curriculum=curriculum,
                   num_workers=num_workers, batch_size_multiple=bsm, validation=validation, document_multiple=multiple,
                   **flags)

    def to_dict(self) -> dict:
        """Plain JSON/YAML-safe mapping that :meth:`from_dict` accepts back."""
        return dataclasses.asdict(self)

    @property
    def longest_seq_len(self) -> int:
        """The longest sequence the run trains on (the curriculum's end, else ``seq_len``)."""
        return self.curriculum.max_seq_len if self.curriculum else self.seq_len

    def source_paths(self) -> dict[str, Location]:
        """Source directories resolved against the current working directory, or their URLs."""
        return {name: Location(p) for name, p in self.sources.items()}

    def fingerprint(self) -> str:
        """Hash of everything that determines the sample order (paths and ``num_workers`` excluded)."""
        d = self.to_dict()
        d.pop("num_workers")
        d.pop("validation")  # evaluation never changes what training reads
        if d["document_multiple"] == 1:
            d.pop("document_multiple")  # the fingerprint of runs from before the setting existed
        d["sources"] = sorted(d["sources"])  # names only: moving the data must not break a resume
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def check_dp_size(self, dp_size: int) -> None:
        """Refuse a data-parallel size that cannot split every step's sequences evenly."""
        if dp_size <= 0 or self.batch_size_multiple % dp_size:
            raise ConfigError(f"data.batch_size_multiple={self.batch_size_multiple}: data-parallel size "
                              f"{dp_size} must divide it (sequences per step are multiples of it)")


def _check_lengths_hold_padded_documents(path: str, multiple: int, seq_len: int,
                                         curriculum: CurriculumConfig | None, validation: ValidationConfig | None):
    """Every sequence length a run reads must be a multiple of ``document_multiple`` (rows of padded documents)."""
    if curriculum is None:
        lengths = [(f"{path}.seq_len", seq_len)]
    elif curriculum.seq_lens:
        lengths = [(f"{path}.curriculum.seq_lens[{i}]", v) for i, v in enumerate(curriculum.seq_lens)]
    else:
        lengths = [(f"{path}.curriculum.{k}", getattr(curriculum, k)) for k in ("min_seq_len", "max_seq_len", "step")]
    if validation is not None and validation.seq_len:
        lengths.append((f"{path}.validation.seq_len", validation.seq_len))
    for name, value in lengths:
        if value % multiple:
            raise _fail(name, value, f"must be a multiple of {path}.document_multiple={multiple} (rows of padded "
                                     "documents)")


def load_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); ConfigError naming the file otherwise."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a config file")
    if not p.is_file():
        where = "" if p.is_absolute() else f" (relative paths resolve against the working directory {os.getcwd()})"
        raise ConfigError(f"config file not found: {p}{where}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Read a data config YAML. A run config works too: its ``data:`` mapping is read, or the file its
    ``data:`` names (relative to the working directory, as ``pretrain`` reads it)."""
    raw = load_yaml_mapping(path)
    data = raw.get("data")
    if isinstance(data, str):
        try:
            raw = load_yaml_mapping(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: data: {exc}") from None
    elif isinstance(data, dict):
        raw = data
    return DataConfig.from_dict(raw)
