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
    phase_of_step = [0] * pre + [1] * anneal
    return cfg, plan_segments(cfg, phase_of_step, [_Phase(r) for r in phases])


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
