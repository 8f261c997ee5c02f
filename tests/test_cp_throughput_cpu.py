"""CPU checks of benchmarks/cp_throughput.py: the grid it plans (real configs through the dry run's estimate, the
recompute it picks), the peak memory it reads from a real training log line, its tokens/s arithmetic, and its
one-line refusals. The runs themselves need GPUs (CP > 1 needs several)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from benchmarks import cp_throughput as B
from hybrid_megatron.devtools import REPO_ROOT as ROOT

GB = 1e9


def test_the_grid_is_every_model_length_and_cp_with_recompute_only_where_none_does_not_fit(tmp_path):
    rows = B.plan([32768, 131072], [1, 2], ["hybrid", "attention"], int(80 * GB), 6, 2, tmp_path)
    assert [(r["model"], r["seq_len"], r["cp"]) for r in rows] == [
        (m, s, c) for s in (32768, 131072) for c in (1, 2) for m in ("hybrid", "attention")]
    by = {(r["model"], r["seq_len"], r["cp"]): r for r in rows}
    assert not any("error" in r for r in rows)
    assert by["hybrid", 32768, 2]["recompute"] == "none" and by["hybrid", 32768, 1]["recompute"] == "full"
    assert by["hybrid", 131072, 2]["recompute"] == "full"
    # the attention-only twin: about the hybrid's parameters, attention in every mixer
    assert 0.97 < by["attention", 32768, 1]["params"] / by["hybrid", 32768, 1]["params"] < 1.0
    assert f"model.hybrid_layer_pattern={B.ATTENTION_PATTERN}" in by["attention", 32768, 1]["overrides"]
    assert "parallel.context_parallel_size=2" in by["hybrid", 32768, 2]["overrides"]


def test_a_setting_the_config_refuses_is_the_rows_error(tmp_path):
    rows = B.plan([32768], [3], ["hybrid"], int(80 * GB), 6, 2, tmp_path)  # 64 Mamba heads: CP 3 does not divide
    assert "CP must divide 64" in rows[0]["error"]


def test_peak_memory_is_read_from_the_training_log_line(tmp_path, caplog):
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.training.metrics import MetricsLogger

    cfg = load_run_config(ROOT / "configs" / "tiny.yaml", ["logging.tensorboard=false", f"logging.run_dir={tmp_path}"])
    metrics = MetricsLogger(cfg, enabled=True, flops_per_token_at=lambda s: 1e9, world_size=1, device_name="cpu")
    metrics.record(1, 256, 4096)
    with caplog.at_level(logging.INFO, logger="hybrid_megatron.train"):
        rates = metrics.log(1, 10, {"loss": 2.5, "window_steps": 1})
    assert B.peak_gib("noise\n" + caplog.text) == pytest.approx(rates["mem_gib"], abs=0.05)
    assert B.peak_gib("no training line") is None


def test_tokens_per_second_counts_the_timed_steps_input_tokens():
    records = [{"step": s, "time": 100.0 + 3 * s + (5 if s > 1 else 0), "tokens": 60000, "input_tokens": 65536}
               for s in range(1, 7)]
    rate = B.timed_rate(records, warmup=2)  # timed from the end of step 2: steps 3..6 in 12 s
    assert rate == {"step_s": 3.0, "tokens_per_s": pytest.approx(4 * 65536 / 12)}
    assert B.timed_rate(records[:2], warmup=2) is None


def test_ratios_pair_models_and_compare_each_cp_with_one_gpu():
    rows = [{"model": m, "seq_len": 32768, "cp": c, "tokens_per_s": t, "tokens_per_s_per_gpu": t / c}
            for m, c, t in (("hybrid", 1, 100.0), ("attention", 1, 80.0), ("hybrid", 2, 180.0))]
    assert dict(B.ratios(rows)) == {"hybrid / attention, seq 32768, CP 1": 1.25,
                                    "hybrid per-GPU CP 2 / CP 1, seq 32768": 0.9}


@pytest.mark.parametrize("argv, message", [
    (["--seqs", "1000"], "--seqs [1000]: no recipe"),
    (["--models", "mamba"], "--models ['mamba']: one of"),
    (["--steps", "0"], "--steps and --sequences must be positive"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "benchmarks/cp_throughput.py", *argv], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    env_path = tmp_path / "bin"
    env_path.mkdir()  # no nvidia-smi on this PATH
    proc = subprocess.run([sys.executable, "benchmarks/cp_throughput.py", "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, env={"PATH": str(env_path),
                                                                       "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_the_plot_is_a_png_of_tokens_per_gpu_by_cp(tmp_path):
    rows = [{"model": m, "seq_len": s, "cp": c, "tokens_per_s_per_gpu": 1000.0 / c}
            for m in ("hybrid", "attention") for s in (32768, 65536) for c in (1, 2, 4)]
    rows.append({"model": "hybrid", "seq_len": 131072, "cp": 1, "error": "out of memory"})  # no point: no line
    B.plot(rows, tmp_path / "cp.png")
    assert (tmp_path / "cp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
