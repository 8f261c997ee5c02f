"""The run's step plan as metadata: phase, sequence length and sequence count of every step, stored as runs
of identical steps (see ``Schedule``).

The sequence length comes from DeepSpeed's ``CurriculumScheduler`` evaluated at the number of tokens
delivered before the step (so its "steps" are tokens), or is ``seq_len`` without a curriculum. Tokens
per step stay (nearly) constant: ``num_sequences = global_batch_tokens // seq_len`` rounded down to a
multiple of ``batch_size_multiple``; every step delivers ``num_sequences * seq_len`` tokens and all
progress (phases, curriculum, source streams) is counted in those delivered tokens.

A step belongs to one phase; the phase moves on once the tokens it delivered reach its ``tokens``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import sys
from dataclasses import dataclass

from data_pipeline.config import CurriculumConfig, DataConfig


@contextlib.contextmanager
def _no_accelerator_probe_warning():
    """Without a GPU, deepspeed's import warns on stderr that it falls back to its CPU accelerator, which
    would stand before the one line a config error prints (the curriculum uses no accelerator). Naming
    the CPU accelerator for the first import, only where torch sees no GPU, keeps it quiet (deepspeed makes
    the same GPU check on that import; later ones are cached and probe nothing)."""
    import os

    if "DS_ACCELERATOR" in os.environ or "deepspeed" in sys.modules:
        yield
        return
    import torch

    if torch.cuda.is_available():
        yield
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        del os.environ["DS_ACCELERATOR"]


class SeqLenCurriculum:
    """Sequence length as a function of tokens delivered, through DeepSpeed's scheduler."""

    def __init__(self, cfg: CurriculumConfig):
        # import only this module path; deepspeed's import-time log lines go to stdout, which
        # `data audit` reserves for JSON, so they are sent to stderr
        with contextlib.redirect_stdout(sys.stderr), _no_accelerator_probe_warning():
            from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

        self._discrete_bounds = list(cfg.max_tokens) if cfg.schedule == "fixed_discrete" else None
        if cfg.schedule == "fixed_discrete":
            schedule_config = {"difficulty": list(cfg.seq_lens), "max_step": list(cfg.max_tokens)}
        else:
            schedule_config = {"total_curriculum_step": cfg.total_tokens, "difficulty_step": cfg.step}
            if cfg.schedule == "fixed_root":
                schedule_config["root_degree"] = cfg.root_degree
        self._scheduler = CurriculumScheduler({
            "curriculum_type": "seqlen", "min_difficulty": cfg.min_seq_len, "max_difficulty": cfg.max_seq_len,
            "schedule_type": cfg.schedule, "schedule_config": schedule_config,
        })

    def seq_len(self, tokens_done: int) -> int:
        return int(self._scheduler.get_difficulty(tokens_done))

    def segment(self, tokens_done: int) -> int:
        """A key that is constant exactly where the length is constant and never decreases: the length for
        the monotone schedules, the interval for ``fixed_discrete`` (whose lengths may repeat), found by
        DeepSpeed's own rule (the first ``max_step`` at or past the token count)."""
        if self._discrete_bounds is not None:
            return bisect.bisect_left(self._discrete_bounds, tokens_done)
        return self.seq_len(tokens_done)


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive steps of one phase with the same sequence length and count."""

    start: int  # first step
    steps: int
    phase: int  # phase index
    seq_len: int
    num_sequences: int  # a multiple of batch_size_multiple
    tokens_before: int  # tokens delivered before the run's first step

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.num_sequences


@dataclass(frozen=True, slots=True)
class StepShape:
    phase: int
    seq_len: int
    num_sequences: int
    tokens_before: int


class Schedule:
    """The whole run as runs of identical steps: its size grows with the number of phases and curriculum
    lengths, never with the number of steps (a 100T-token plan is a few hundred runs)."""

    def __init__(self, runs: tuple[Run, ...], phase_names: tuple[str, ...]):
        self.runs, self.phase_names = runs, phase_names
        self._starts = [r.start for r in runs]

    @property
    def total_steps(self) -> int:
        last = self.runs[-1]
        return last.start + last.steps

    @property
    def total_tokens(self) -> int:
        last = self.runs[-1]
        return last.tokens_before + last.steps * last.tokens_per_step

    @property
    def max_seq_len(self) -> int:
        return max(r.seq_len for r in self.runs)

    def shapes(self) -> set[tuple[int, int]]:
        """Every (sequence length, sequences per step) the run trains at."""
        return {(r.seq_len, r.num_sequences) for r in self.runs}

    def at(self, step: int) -> StepShape:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the run's {self.total_steps} steps")
        r = self.runs[bisect.bisect_right(self._starts, step) - 1]
        return StepShape(r.phase, r.seq_len, r.num_sequences, r.tokens_before + (step - r.start) * r.tokens_per_step)

    def phase_start(self, phase: int) -> int | None:
        """The first step of phase ``phase`` (None when the run has no step in it)."""
        return next((r.start for r in self.runs if r.phase == phase), None)


def num_sequences(config: DataConfig, seq_len: int) -> int:
    bsm = config.batch_size_multiple
    return (config.global_batch_tokens // seq_len) // bsm * bsm


def step_input_tokens(config: DataConfig, seq_len: int) -> int:
    """Input tokens of one optimizer step at ``seq_len`` over every data-parallel rank: every token the model runs
    on, loss-masked or not (what throughput, FLOPs and the token axis of ``compare`` count; the loss tokens of a
    step, answers only in MQAR, can be far fewer)."""
    return num_sequences(config, seq_len) * seq_len


def _steps_at_this_length(curriculum: SeqLenCurriculum, done: int, per_step: int, limit: int) -> int:
    """How many of the next ``limit`` steps (each ``per_step`` tokens, the first after ``done``) keep the
    current curriculum segment: a binary search over a monotone segment key, not a walk over steps."""
    key = curriculum.segment(done)
    if curriculum.segment(done + (limit - 1) * per_step) == key:
        return limit
    lo, hi = 1, limit - 1  # step lo - 1 is in the segment, step hi is not
    while lo < hi:
        mid = (lo + hi) // 2
        if curriculum.segment(done + mid * per_step) == key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _build(config: DataConfig) -> Schedule:
    curriculum = SeqLenCurriculum(config.curriculum) if config.curriculum else None
    runs: list[Run] = []
    done = step = 0
    for p, phase in enumerate(config.phases):
        in_phase = 0
        while in_phase < phase.tokens:
            length = curriculum.seq_len(done) if curriculum else config.seq_len
            n = num_sequences(config, length)
            assert n > 0, (length, config.global_batch_tokens)  # guaranteed by DataConfig validation
            per_step = n * length
            k = -(-(phase.tokens - in_phase) // per_step)  # steps to finish the phase at this length
            if curriculum is not None:
                k = _steps_at_this_length(curriculum, done, per_step, k)
            runs.append(Run(start=step, steps=k, phase=p, seq_len=length, num_sequences=n, tokens_before=done))
            step += k
            done += k * per_step
            in_phase += k * per_step
    return Schedule(tuple(runs), tuple(ph.name for ph in config.phases))


@functools.lru_cache(maxsize=8)
def _cached(fingerprint: str, config_json: str) -> Schedule:
    import json

    return _build(DataConfig.from_dict(json.loads(config_json)))


def build_schedule(config: DataConfig) -> Schedule:
    """The step plan of ``config`` (cached per config)."""
    import json

    return _cached(config.fingerprint(), json.dumps(config.to_dict(), sort_keys=True))
