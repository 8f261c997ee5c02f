"""Exact-ratio blending per global batch, phases with replay, and the global sample order.

Everything here is metadata-only arithmetic that every data-parallel rank computes identically.

Components. Phase ``p`` with normalised weights ``w_p`` and replay share ``r_p`` draws from
``(1 - r_p) * w_p[s]`` for its own sources and ``r_p * eff_{p-1}[s]`` for the *replay* components, where
``eff_p = (1 - r_p) * w_p + r_p * eff_{p-1}`` is a phase's effective mixture (``eff_0 = w_0``). All
components of a source read the same stream, whose position is global across phases, so replay
continues the earlier phase's streams where they stopped (nothing is re-read until the epoch wraps).

Counts per step. A step of ``n`` sequences gives component ``c`` either ``floor(n * w_c)`` or
``ceil(n * w_c)`` samples, so every step matches the weights to within one sample. The ``n - sum(floor)``
extra samples go to the components furthest below their cumulative target within the phase
(``N * w_c - allocated_c``; ties to the earlier component), which keeps every component's cumulative
count within two samples of its target over the whole phase (tested), not just on average.

Order. Samples are laid out component by component, each taking consecutive windows of ``seq_len + 1``
tokens at stride ``seq_len`` from its source stream; the global batch is then shuffled with
``default_rng([seed, 1, step])`` and rank ``r`` of ``W`` takes the ``r``-th contiguous slice. The order is a
function of (seed, config, step) only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Component:
    source: str
    weight: float
    replay: bool


@dataclass(frozen=True)
class StepPlan:
    """The global batch of one step as metadata; ``samples`` are in shuffled global order."""

    step: int
    phase: str
    seq_len: int
    sources: tuple[str, ...]  # per sample
    starts: tuple[int, ...]  # per sample: stream position of its first token
    replay: tuple[bool, ...]  # per sample: drawn by a replay component

    def rank_slice(self, dp_rank: int, dp_size: int) -> range:
        n_local = len(self.starts) // dp_size
        return range(dp_rank * n_local, (dp_rank + 1) * n_local)


def phase_components(config: DataConfig) -> list[list[Component]]:
    """The components of every phase (own sources first, then replay ones), weights summing to one."""
    out: list[list[Component]] = []
    eff_prev: dict[str, float] = {}
    for phase in config.phases:
        w = phase.normalized_weights()
        r = phase.replay
        comps = [Component(s, (1 - r) * v, False) for s, v in w.items()]
        if r:
            comps += [Component(s, r * v, True) for s, v in eff_prev.items()]
        eff: dict[str, float] = {}
        for c in comps:
            eff[c.source] = eff.get(c.source, 0.0) + c.weight
        out.append(comps)
        eff_prev = eff
    return out


def allocate(n: int, weights: list[float], allocated: list[int], phase_samples: int) -> list[int]:
    """Split ``n`` samples over components: floor or ceil of ``n * w``, extras to the largest deficit."""
    ideal = [n * w for w in weights]
    counts = [math.floor(x + 1e-9) for x in ideal]
    extra = n - sum(counts)
    if extra:
        after = phase_samples + n
        deficit = [(after * w - a - c, -i) for i, (w, a, c) in enumerate(zip(weights, allocated, counts))
                   if ideal[i] - counts[i] > 1e-9]
        for _, neg_i in sorted(deficit, reverse=True)[:extra]:
            counts[-neg_i] += 1
    assert sum(counts) == n, (n, weights, counts)
    return counts


class MixturePlanner:
    """Turns a loader state into the next step's plan and the state after it (pure, no I/O)."""

    def __init__(self, config: DataConfig, schedule: Schedule, epoch_tokens: dict[str, int], log_epochs: bool):
        self.config = config
        self.schedule = schedule
        self.components = phase_components(config)
        self.epoch_tokens = epoch_tokens
        self.log_epochs = log_epochs

    def initial_state(self) -> dict:
        return {"step": 0, "positions": {s: 0 for s in sorted(self.config.sources)}, "phase_samples": 0,
                "allocated": [0] * len(self.components[0])}

    def plan(self, state: dict) -> tuple[StepPlan, dict]:
        """Plan step ``state['step']``; returns (plan, state after delivering it). Caller checks the end."""
        k = state["step"]
        sch = self.schedule
        shape = sch.at(k)
        p, seq_len, n = shape.phase, shape.seq_len, shape.num_sequences
        comps = self.components[p]
        new_phase = k > 0 and sch.at(k - 1).phase != p
        allocated = [0] * len(comps) if new_phase else list(state["allocated"])
        phase_samples = 0 if new_phase else state["phase_samples"]
        counts = allocate(n, [c.weight for c in comps], allocated, phase_samples)
        positions = dict(state["positions"])
        sources, starts, replay = [], [], []
        for comp, cnt in zip(comps, counts):
            pos = positions[comp.source]
            sources += [comp.source] * cnt
            starts += range(pos, pos + cnt * seq_len, seq_len)
            replay += [comp.replay] * cnt
            positions[comp.source] = pos + cnt * seq_len
            self._log_wrap(comp.source, pos, positions[comp.source], k)
        perm = np.random.default_rng([self.config.seed & 0xFFFFFFFF, 1, k]).permutation(n)
        plan = StepPlan(step=k, phase=sch.phase_names[p], seq_len=seq_len,
                        sources=tuple(sources[i] for i in perm), starts=tuple(starts[i] for i in perm),
                        replay=tuple(replay[i] for i in perm))
        after = {"step": k + 1, "positions": positions, "phase_samples": phase_samples + n,
                 "allocated": [a + c for a, c in zip(allocated, counts)]}
        return plan, after

    def _log_wrap(self, source: str, before: int, after: int, step: int) -> None:
        size = self.epoch_tokens[source]
        if self.log_epochs and after // size > before // size:
            log.warning("source %s: epoch %d begins at step %d (its %d tokens are being read again, "
                        "in a new member order)", source, after // size, step, size)
