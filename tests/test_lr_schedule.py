"""LR plan by data phase: pretraining schedule, then the anneal's re-warmup and decay to zero."""

from __future__ import annotations

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import load_run_config
from hybrid_megatron.training.lr import lr_at, plan_segments


class _Phase:
    def __init__(self, replay):
        self.replay = replay


def _plan(overrides=(), phases=(0.0, 0.5), pre=80, anneal=20):
    cfg = load_run_config("configs/tiny.yaml", ["schedule.lr_warmup_steps=10", "schedule.anneal_warmup_steps=5", *overrides])
    return cfg, plan_segments(cfg, pre + anneal, pre if anneal else None, [_Phase(r) for r in phases])


def test_anneal_phase_rewarms_to_a_share_of_peak_then_decays_to_zero():
    cfg, (pre, anneal) = _plan()
    assert (pre.start, pre.steps, anneal.start, anneal.steps) == (0, 80, 80, 20)
    peak = cfg.optim.lr
    assert lr_at(pre, 0) == 0.0 and lr_at(pre, 10) == pytest.approx(peak)
    assert lr_at(pre, 80) == pytest.approx(cfg.optim.min_lr)  # WSD decayed to min_lr by the phase end
    assert anneal.init_lr == pytest.approx(cfg.optim.min_lr)
    assert lr_at(anneal, 5) == pytest.approx(0.75 * peak)
    assert lr_at(anneal, 20) == pytest.approx(0.0)


def test_wsd_holds_the_peak_until_its_decay_window():
    cfg, (pre, _) = _plan()
    decay_start = pre.steps - pre.wsd_decay_steps
    assert pre.wsd_decay_steps == 16  # 0.2 of 80
    assert lr_at(pre, decay_start) == pytest.approx(cfg.optim.lr)
    assert lr_at(pre, decay_start + 8) < cfg.optim.lr


def test_without_replay_the_last_phase_continues_the_pretraining_schedule():
    _, segments = _plan(phases=(0.0, 0.0))
    assert len(segments) == 1 and segments[0].steps == 100


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match="lr_warmup_steps=500 is not below the 80 pretraining steps"):
        _plan(["schedule.lr_warmup_steps=500"])


def test_cosine_reaches_min_lr():
    cfg, (pre, _) = _plan(["schedule.lr_decay_style=cosine"])
    assert lr_at(pre, 45) == pytest.approx((cfg.optim.lr + cfg.optim.min_lr) / 2)
    assert lr_at(pre, 80) == pytest.approx(cfg.optim.min_lr)


def test_megatron_param_groups_get_the_planned_lr_and_wd_at_every_step():
    """PhasedScheduler on megatron's real param groups (built by its grouping from a model with fp32 SSM
    params, bf16 weights and 1-D params): the applied LR is the plan's at every step, the anneal's
    re-warm peak and zero end included; weight decay only on the 2-D weights."""
    from types import SimpleNamespace

    from megatron_groups import Stack, megatron_param_groups

    from hybrid_megatron.training.lr import PhasedScheduler

    cfg, segments = _plan()
    o = cfg.optim
    groups = megatron_param_groups(Stack(), lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay)
    optimizer = SimpleNamespace(param_groups=groups)
    scheduler = PhasedScheduler(optimizer, segments, o.weight_decay)
    pre, anneal = segments
    for step in range(100):
        seg = pre if step < anneal.start else anneal
        want = lr_at(seg, step - seg.start)
        for g in groups:
            assert g["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), (step, g["lr"], want)
            decayed = all(p.dim() == 2 for p in g["params"])  # only the 2-D weights decay
            assert g["weight_decay"] == pytest.approx(o.weight_decay if decayed else 0.0)
        assert scheduler.current_lr() == pytest.approx(want, rel=1e-12, abs=1e-15)
        scheduler.step()
    assert any(g["weight_decay"] > 0 for g in groups) and any(g["weight_decay"] == 0 for g in groups)
    # the points that matter: re-warmed to 0.75 x peak, then down to zero at the end
    assert lr_at(anneal, anneal.warmup) == pytest.approx(0.75 * o.lr)
    assert groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
