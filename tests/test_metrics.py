"""Training metrics (training/metrics.py): tokens/s, TFLOP/s/GPU and MFU from our FLOPs counter over a
logging window, the console line and the TensorBoard scalars."""

from __future__ import annotations

import logging

import pytest

from hybrid_megatron.config import load_run_config
from hybrid_megatron.training import metrics as M


def test_peaks_by_device_name():
    assert M.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert M.peak_tflops("NVIDIA H200") == 989.0
    assert M.peak_tflops("Some other GPU") is None


def test_window_rates_and_mfu(tmp_path, monkeypatch, caplog):
    cfg = load_run_config("configs/tiny.yaml", [f"logging.run_dir={tmp_path}"])
    now = [100.0]  # the window opens at 100 s ...
    monkeypatch.setattr(M.time, "perf_counter", lambda: now[0])
    logger = M.MetricsLogger(cfg, enabled=True, flops_per_token_at=lambda seq: 1e9 * seq / 1024,
                             world_size=4, device_name="NVIDIA H100 80GB HBM3")
    logger.record(1, 1024, 300_000)  # 3e5 tokens at 1 GFLOP each
    logger.record(2, 512, 200_000)  # shorter sequences: 0.5 GFLOP per token
    now[0] = 102.0  # ... and closes at 102 s
    with caplog.at_level(logging.INFO, logger="hybrid_megatron.train"):
        rates = logger.log(2, 10, {"loss": 2.5, "window_steps": 2})
    logger.close()
    flops = 300_000 * 1e9 + 200_000 * 0.5e9
    assert rates["tokens_per_s"] == pytest.approx(500_000 / 2.0)
    assert rates["tflops_per_gpu"] == pytest.approx(flops / 2.0 / 4 / 1e12)
    assert rates["mfu"] == pytest.approx(rates["tflops_per_gpu"] / 989.0)
    line = caplog.records[-1].getMessage()
    assert line.startswith("step 2/10 | loss 2.5 | tok/s 250,000 | TFLOP/s/GPU 50.0 | MFU 5.1%")
    assert "ETA 0.1min" in line  # 8 steps left at 1 s per step
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert {"train/loss", "train/tokens_per_s", "train/mfu"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("train/loss")[0].value == pytest.approx(2.5)


def test_a_resumed_run_purges_tensorboard_events_past_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_run_config("configs/tiny.yaml", [f"logging.run_dir={tmp_path}"])
    first = M.MetricsLogger(cfg, enabled=True, flops_per_token_at=lambda s: 1.0, world_size=1, device_name="H100")
    for step in range(1, 9):
        first.record(step, 1024, 10)
        first.log(step, 20, {"loss": float(step)})
    first.close()
    resumed = M.MetricsLogger(cfg, enabled=True, flops_per_token_at=lambda s: 1.0, world_size=1, device_name="H100",
                              start_step=5)
    for step in range(6, 11):
        resumed.record(step, 1024, 10)
        resumed.log(step, 20, {"loss": 100.0 + step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 11)]


def test_wandb_offline_continues_one_run_per_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_run_config("configs/tiny.yaml", [f"logging.run_dir={tmp_path}", "logging.wandb_project=hm-test",
                                                "logging.tensorboard=false"])
    ids = []
    for _ in range(2):  # a first attempt, then the requeued one
        logger = M.MetricsLogger(cfg, enabled=True, flops_per_token_at=lambda s: 1.0, world_size=1, device_name="H100")
        assert logger._wandb.settings.mode == "offline"
        ids.append(logger._wandb.id)
        logger.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()


def test_logged_loss_is_the_token_weighted_mean_of_the_window():
    import math

    from hybrid_megatron.training.metrics import LossWindow

    window = LossWindow()
    window.add(2.0, 100)
    window.add(4.0, 300)
    window.add(float("nan"), 100, skipped=True)  # a skipped step does not count
    window.add(float("inf"), 100)
    assert window.close() == 3.5
    assert math.isnan(window.close())  # the next window starts empty
    window.add(1.0, 10)
    assert window.close() == 1.0


def test_the_log_line_shows_what_document_padding_pushed_out_only_when_documents_are_padded(tmp_path, caplog):
    plain = load_run_config("configs/tiny.yaml", [f"logging.run_dir={tmp_path}"])
    padded = load_run_config("configs/tiny.yaml", [f"logging.run_dir={tmp_path}", "data.document_multiple=8"])
    assert M.padding_dropped(plain, 30, 1000) == {}
    assert M.padding_dropped(padded, 30, 1000) == {"pad_dropped": 0.03}
    assert M.padding_dropped(padded, 0, 0) == {"pad_dropped": 0.0}
    logger = M.MetricsLogger(padded, enabled=True, flops_per_token_at=lambda seq: 1e9, world_size=1,
                             device_name="cpu")
    with caplog.at_level(logging.INFO, logger="hybrid_megatron.train"):
        logger.log(1, 10, {"loss": 2.5, **M.padding_dropped(padded, 30, 1000), "window_steps": 1})
    logger.close()
    assert "| pad_dropped 0.03 |" in caplog.records[-1].getMessage()
