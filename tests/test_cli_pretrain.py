"""`hybrid-megatron pretrain`: dry-run output and one-line errors with exit code 2 (CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hybrid_megatron", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_prints_layout_params_and_flops():
    proc = _cli("pretrain", "configs/tiny.yaml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "hybrid_layer_pattern: M-M*-|M-M*-" in out  # the resolved config
    assert "pp stage 0: [0:10] M-M*-M-M*-" in out
    assert "parameters: 15,141,568" in out
    assert "FLOPs per token at seq 1024: forward" in out


def test_dry_run_shows_each_pipeline_stage():
    proc = _cli("pretrain", "configs/tiny.yaml", "--dry-run", "parallel.pipeline_model_parallel_size=2")
    assert proc.returncode == 0, proc.stderr
    assert "pp stage 0: [0:5] M-M*-" in proc.stdout and "pp stage 1: [5:10] M-M*-" in proc.stdout


def _one_line_error(proc, needle):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_bad_pattern_symbol_exits_2_with_its_position():
    _one_line_error(_cli("pretrain", "configs/tiny.yaml", "--dry-run", "model.hybrid_layer_pattern=M-Q"),
                    "unknown symbol 'Q' at position 2")


def test_tp_not_dividing_heads_names_both_numbers():
    _one_line_error(_cli("pretrain", "configs/tiny.yaml", "--dry-run", "parallel.tensor_model_parallel_size=16"),
                    "tensor_model_parallel_size=16 does not divide model.num_attention_heads=8")


def test_dry_run_refuses_a_step_count_the_lr_plan_cannot_run():
    # the training loop refuses the same, but only after the processes have started and joined NCCL
    _one_line_error(_cli("pretrain", "configs/tiny.yaml", "--dry-run", "train.train_steps=6"),
                    "schedule.lr_warmup_steps=50 is not below the 6 pretraining steps")
    _one_line_error(_cli("pretrain", "configs/tiny.yaml", "--dry-run", "train.train_steps=5000"),
                    "train.train_steps=5000 exceeds the 621 steps the data phases define")


def test_dry_run_prints_the_lr_plan():
    proc = _cli("pretrain", "configs/tiny.yaml", "--dry-run", "train.train_steps=100")
    assert proc.returncode == 0, proc.stderr
    assert "train.train_steps stops it at step 100" in proc.stdout
    assert "lr: steps 1-100 WSD, warmup 50 to 0.002\n" in proc.stdout  # the anneal phase is cut off
    full = _cli("pretrain", "configs/tiny.yaml", "--dry-run").stdout
    assert "lr: steps 1-498 WSD, warmup 50 to 0.002; steps 499-621 linear, warmup 20 to 0.0015\n" in full


def test_missing_data_path_is_named():
    proc = _cli("pretrain", "configs/tiny.yaml", "--dry-run", "build_sample_data=false",
                "data.sources.code=/nonexistent/code")
    _one_line_error(proc, "/nonexistent/code")


def test_missing_config_file():
    _one_line_error(_cli("pretrain", "configs/nope.yaml", "--dry-run"), "config file not found: configs/nope.yaml")


def test_no_config_names_only_the_config_as_missing():
    proc = _cli("pretrain")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("the following arguments are required: config")


def test_pretrain_without_a_gpu_says_so():
    proc = _cli("pretrain", "configs/tiny.yaml", "train.train_steps=1")
    _one_line_error(proc, "needs a CUDA GPU")


def test_1b_recipe_is_about_a_billion_parameters():
    proc = _cli("pretrain", "configs/1b.yaml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("parameters: "))
    params = int(line.split()[1].replace(",", ""))
    assert 0.9e9 < params < 1.3e9
