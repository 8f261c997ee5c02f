"""Learning-rate schedule by data phase, on megatron's ``OptimizerParamScheduler``.

Pretraining phases share one schedule (warmup, then cosine / WSD / linear / constant to min_lr).
When the last data phase anneals (it has ``replay`` > 0, Zyphra-style), it gets a schedule of its
own: linear re-warmup from the LR reached at the end of pretraining to
``anneal_peak_lr_fraction * lr``, then linear decay to zero over the rest of the phase (Zyphra found
the annealing peak matters and the decay shape barely does). Each segment is a megatron scheduler
counting optimizer steps (increment 1), so the LR formulas are megatron's.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import RunConfig


@dataclass(frozen=True, slots=True)
class Segment:
    start: int  # first optimizer step (0-based) of the segment
    steps: int
    init_lr: float
    max_lr: float
    min_lr: float
    warmup: int
    style: str
    wsd_decay_steps: int | None = None
    wsd_style: str | None = None


def plan_segments(cfg: RunConfig, num_steps: int, last_phase_start: int | None, phases: list) -> list[Segment]:
    """Schedule segments for a run of ``num_steps`` data steps whose last phase starts at step
    ``last_phase_start`` (None: no step in it); that phase is an anneal when it replays."""
    total = num_steps
    if cfg.train.train_steps is not None:
        total = cfg.train.train_steps
    o, s = cfg.optim, cfg.schedule
    anneal_start = None
    last = len(phases) - 1
    if last > 0 and phases[last].replay > 0 and last_phase_start is not None and last_phase_start < total:
        anneal_start = last_phase_start
    pre_steps = anneal_start if anneal_start is not None else total
    if s.lr_warmup_steps >= pre_steps:
        raise ConfigError(
            f"schedule.lr_warmup_steps={s.lr_warmup_steps} is not below the {pre_steps} pretraining steps"
        )
    wsd = None
    if s.lr_decay_style == "WSD":
        wsd = max(1, round(s.wsd_decay_fraction * pre_steps))
    segments = [
        Segment(0, pre_steps, 0.0, o.lr, o.min_lr, s.lr_warmup_steps, s.lr_decay_style, wsd, s.wsd_decay_style)
    ]
    if anneal_start is not None:
        steps = total - anneal_start
        if s.anneal_warmup_steps >= steps:
            raise ConfigError(
                f"schedule.anneal_warmup_steps={s.anneal_warmup_steps} is not below the {steps} annealing steps"
            )
        end_lr = lr_at(segments[0], pre_steps)
        peak = s.anneal_peak_lr_fraction * o.lr
        segments.append(Segment(anneal_start, steps, min(end_lr, peak), peak, 0.0, s.anneal_warmup_steps, "linear"))
    return segments


def planned_steps(cfg: RunConfig, schedule) -> int:
    """The optimizer steps the run trains: ``train.train_steps``, else all its data phases'."""
    return cfg.train.train_steps or schedule.total_steps


def run_plan(cfg: RunConfig, schedule) -> tuple[int, list[Segment]]:
    """The run's optimizer steps and LR segments for a data schedule (``build_schedule``); ConfigError when
    ``train.train_steps`` passes the data or a warmup does not fit its segment. The dry run and the training
    loop both call it, so a plan that cannot run is refused before any GPU work."""
    total = planned_steps(cfg, schedule)
    if total > schedule.total_steps:
        raise ConfigError(f"train.train_steps={total} exceeds the {schedule.total_steps} steps the data phases define")
    last = len(cfg.data.phases) - 1
    return total, plan_segments(cfg, schedule.total_steps, schedule.phase_start(last), cfg.data.phases)


def lr_at(seg: Segment, step_in_segment: int) -> float:
    """The LR megatron's scheduler gives at this step of the segment (pure; used for planning and tests)."""
    import math

    n = step_in_segment
    if seg.warmup > 0 and n <= seg.warmup:
        return seg.init_lr + (seg.max_lr - seg.init_lr) * n / seg.warmup
    if seg.style == "constant":
        return seg.max_lr
    if n > seg.steps:
        return seg.min_lr
    delta = seg.max_lr - seg.min_lr
    if seg.style == "WSD":
        anneal_start = seg.steps - seg.wsd_decay_steps
        if n <= anneal_start:
            return seg.max_lr
        ratio = (n - anneal_start) / seg.wsd_decay_steps
        coeff = {"linear": 1.0 - ratio, "cosine": 0.5 * (math.cos(math.pi * ratio) + 1.0),
                 "exponential": (2.0 * math.pow(0.5, ratio)) - 1.0, "minus_sqrt": 1.0 - math.sqrt(ratio)}[seg.wsd_style]
        return seg.min_lr + coeff * delta
    ratio = (n - seg.warmup) / (seg.steps - seg.warmup)
    if seg.style == "linear":
        return seg.min_lr + (1.0 - ratio) * delta
    return seg.min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * delta  # cosine


class PhasedScheduler:
    """Drives one megatron OptimizerParamScheduler per segment; ``step()`` once per optimizer step."""

    def __init__(self, optimizer, segments: list[Segment], weight_decay: float):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.optimizer = optimizer
        self.segments = segments
        self.schedulers = [
            OptimizerParamScheduler(
                optimizer,
                init_lr=seg.init_lr,
                max_lr=seg.max_lr,
                min_lr=seg.min_lr,
                lr_warmup_steps=seg.warmup,
                lr_decay_steps=seg.steps,
                lr_decay_style=seg.style,
                start_wd=weight_decay,
                end_wd=weight_decay,
                wd_incr_steps=seg.steps,
                wd_incr_style="constant",
                wsd_decay_steps=seg.wsd_decay_steps,
                lr_wsd_decay_style=seg.wsd_style,
            )
            for seg in segments
        ]
        self.num_steps = 0
        self._apply()

    def _active(self) -> int:
        idx = 0
        for i, seg in enumerate(self.segments):
            if self.num_steps >= seg.start:
                idx = i
        return idx

    def _apply(self) -> None:
        i = self._active()
        seg = self.segments[i]
        # megatron's param groups carry max_lr / min_lr (the optimizer config's), and its scheduler takes
        # those over its own: the segment's must be on the groups, or the anneal would re-warm to the
        # full peak and stop at min_lr instead of zero
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = seg.max_lr, seg.min_lr
        sched = self.schedulers[i]
        sched.num_steps = self.num_steps - seg.start
        sched.step(0)  # sets lr / wd on every param group

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def current_lr(self) -> float:
        """The LR the optimizer applies now (read back from it, not recomputed)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "segments": [_seg_dict(s) for s in self.segments]}

    def load_state_dict(self, state: dict) -> None:
        saved = [Segment(**d) for d in state["segments"]]
        if saved != self.segments:
            raise ConfigError(
                "the learning-rate schedule differs from the checkpoint's (optim/schedule/data phases changed); "
                "resume with the same settings or start from the weights (checkpoint.load with a weights-only checkpoint)"
            )
        self.num_steps = int(state["num_steps"])
        self._apply()


def _seg_dict(seg: Segment) -> dict:
    return {f: getattr(seg, f) for f in seg.__slots__}
