"""The run's step plan as metadata: phase, sequence length and sequence count of every step.

The sequence length comes from DeepSpeed's ``CurriculumScheduler`` evaluated at the number of tokens
delivered before the step (so its "steps" are tokens), or is ``seq_len`` without a curriculum. Tokens
per step stay (nearly) constant: ``num_sequences = global_batch_tokens // seq_len`` rounded down to a
multiple of ``batch_size_multiple``; every step delivers ``num_sequences * seq_len`` tokens and all
progress (phases, curriculum, source streams) is counted in those delivered tokens.

A step belongs to one phase; the phase moves on once the tokens it delivered reach its ``tokens``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class Schedule:
    """Per-step arrays of the whole run (index = step)."""

    phase: np.ndarray  # int32 phase index
    seq_len: np.ndarray  # int64
    num_sequences: np.ndarray  # int64, multiple of batch_size_multiple
    tokens_before: np.ndarray  # int64 tokens delivered before the step
    phase_names: tuple[str, ...]

    @property
    def total_steps(self) -> int:
        return int(self.phase.size)

    @property
    def total_tokens(self) -> int:
        return int(self.tokens_before[-1] + self.seq_len[-1] * self.num_sequences[-1])


def num_sequences(config: DataConfig, seq_len: int) -> int:
    bsm = config.batch_size_multiple
    return (config.global_batch_tokens // seq_len) // bsm * bsm


def _build(config: DataConfig) -> Schedule:
    curriculum = SeqLenCurriculum(config.curriculum) if config.curriculum else None
    phases, lens, counts, before = [], [], [], []
    done = 0
    for p, phase in enumerate(config.phases):
        in_phase = 0
        while in_phase < phase.tokens:
            length = curriculum.seq_len(done) if curriculum else config.seq_len
            n = num_sequences(config, length)
            assert n > 0, (length, config.global_batch_tokens)  # guaranteed by DataConfig validation
            phases.append(p)
            lens.append(length)
            counts.append(n)
            before.append(done)
            done += n * length
            in_phase += n * length
    return Schedule(phase=np.asarray(phases, np.int32), seq_len=np.asarray(lens, np.int64),
                    num_sequences=np.asarray(counts, np.int64), tokens_before=np.asarray(before, np.int64),
                    phase_names=tuple(ph.name for ph in config.phases))


@functools.lru_cache(maxsize=8)
def _cached(fingerprint: str, config_json: str) -> Schedule:
    import json

    return _build(DataConfig.from_dict(json.loads(config_json)))


def build_schedule(config: DataConfig) -> Schedule:
    """The step plan of ``config`` (cached per config)."""
    import json

    return _cached(config.fingerprint(), json.dumps(config.to_dict(), sort_keys=True))
