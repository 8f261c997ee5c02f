"""benchmarks/tiny_run.py's CPU side: the summary of a run's losses.jsonl and the unigram-entropy baseline."""

from __future__ import annotations

import math

import pytest

from benchmarks import tiny_run as T
from data_helpers import make_source, mix_config
from hybrid_megatron.config import load_run_config
from hybrid_megatron.devtools import REPO_ROOT as ROOT


def test_summary_windows_phases_rate_and_the_anneal_lr():
    cfg = load_run_config(ROOT / "configs" / "tiny.yaml", ["schedule.anneal_warmup_steps=5"])
    records = [{"step": s, "loss": 5.0 / s, "tokens": 600, "input_tokens": 1000, "time": 10.0 + 0.5 * s,
                "phase": "pretrain" if s <= 150 else "anneal", "lr": 1e-3 if s != 155 else 7.5e-4}
               for s in range(1, 201)]
    records[-1]["lr"] = 0.0
    out = T.summarize(records, cfg)
    assert out["steps_run"] == 200 and out["loss_first_step"] == 5.0
    assert list(out["mean_loss_last_10_by_window"]) == ["91-100", "191-200"]
    assert out["mean_loss_last_10_by_window"]["191-200"] == pytest.approx(sum(5.0 / s for s in range(191, 201)) / 10)
    assert set(out["mean_loss_by_phase_last_20"]) == {"pretrain", "anneal"}
    assert out["tokens_per_s_steady"] == pytest.approx(1000 / 0.5)  # input tokens, not the 600 loss tokens
    lr = out["anneal_lr"]
    assert lr["applied_at_peak_step"] == 7.5e-4 and lr["planned_peak"] == pytest.approx(0.75 * cfg.optim.lr)
    assert lr["applied_at_last_step"] == 0.0


def test_a_run_without_steps_summarizes_to_nothing():
    cfg = load_run_config(ROOT / "configs" / "tiny.yaml")
    assert T.summarize([], cfg) == {"steps_run": 0, "loss_first_step": None}


def test_unigram_entropy_of_random_text_is_near_log_of_its_alphabet(tmp_path):
    sources = {name: make_source(tmp_path, name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    got = T.unigram_entropy(mix_config(sources), steps=5)
    assert got["tokens"] == 5 * 4096
    assert math.log(60) < got["nats"] < math.log(70)  # 66 symbols drawn uniformly, plus EOS
