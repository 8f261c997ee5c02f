"""configs/pretrain_7b.yaml: the dry-run on CPU (issue 6, item 1) and the recipe's choices."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_megatron.config import load_run_config
from hybrid_megatron.model import memory
from hybrid_megatron.model import pattern as pat

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/pretrain_7b.yaml"
VOCAB = 131072


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hybrid_megatron", "pretrain", CONFIG, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def dry_run() -> str:
    proc = _cli("--dry-run")  # the data sources are placeholders under /data: a note, not an error
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_parameter_count_is_7b_class(dry_run):
    total = int(re.search(r"^parameters: ([\d,]+) ", dry_run, re.M).group(1).replace(",", ""))
    assert 6.5e9 <= total <= 8.5e9


def test_flops_per_token_are_printed(dry_run):
    fwd, train = re.search(r"FLOPs per token at seq 4096: forward ([\d,]+), training ([\d,]+)", dry_run).groups()
    assert int(train.replace(",", "")) == 3 * int(fwd.replace(",", ""))


def test_memory_per_gpu_fits_an_80gb_h100_with_margin(dry_run):
    section = dry_run.split("# memory per GPU (estimate)\n", 1)[1]
    assert section.startswith("8 GPUs = TP 2 x PP 1 x DP 4;")
    worst = re.search(r"^worst: pp stage \d+, total ([\d.]+) GB: fits an 80 GB H100 with ([\d.]+) GB to spare",
                      section, re.M)
    assert worst, section
    assert float(worst.group(1)) < 80 and float(worst.group(2)) >= 10
    assert "data: missing source directories" in dry_run


def test_layout_also_fits_on_the_default_four_nodes_and_a_bad_layout_does_not():
    cfg = load_run_config(ROOT / CONFIG)
    assert max(st.total for st in memory.estimate(cfg, VOCAB, 4096, world_size=32)) < memory.GPU_BYTES
    bad = load_run_config(ROOT / CONFIG, [
        "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
        "parallel.use_distributed_optimizer=false", "parallel.overlap_param_gather=false",
    ])
    assert max(st.total for st in memory.estimate(bad, VOCAB, 4096, world_size=8)) > memory.GPU_BYTES


def test_gpus_not_divisible_by_tp_times_pp_exits_2_with_one_line():
    proc = _cli("--dry-run", "--gpus", "7")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == ["error: --gpus 7: must be a positive multiple of TP 2 x PP 1 = 2"]


def test_gpus_whose_dp_size_cannot_split_the_batch_exit_2():
    proc = _cli("--dry-run", "--gpus", "24")  # DP 12 does not divide data.batch_size_multiple=256
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: data.batch_size_multiple=256: data-parallel size 12 must divide it")


def test_recipe_follows_the_hybrid_evidence():
    cfg = load_run_config(ROOT / CONFIG)
    m, d, p = cfg.model, cfg.data, cfg.precision
    flat = pat.layers(m.hybrid_layer_pattern)
    mixers = [i for i, s in enumerate(flat) if s in "M*"]
    attention = [k for k, i in enumerate(mixers) if flat[i] == "*"]
    assert len(mixers) / len(attention) == 7 and len({b - a for a, b in zip(attention, attention[1:])}) == 1
    assert (m.normalization, m.activation, m.position_embedding_type, m.tie_embeddings) == (
        "RMSNorm", "squared_relu", "none", False)
    assert m.num_attention_heads // m.num_kv_heads == 4 and m.num_mamba_heads == 128
    assert (p.fp8, p.fp8_recipe, p.fp8_bf16_layers_at_start, p.fp8_bf16_layers_at_end, p.fp32_ssm_params) == (
        "hybrid", "tensorwise", 2, 2, True)
    assert d.global_batch_tokens == 2**20 and (d.curriculum.max_seq_len if d.curriculum else d.seq_len) == 4096
    pretrain, anneal = d.phases
    assert anneal.replay == 0.6 and anneal.tokens / (pretrain.tokens + anneal.tokens) == pytest.approx(0.1)
    s, o = cfg.schedule, cfg.optim
    assert s.lr_decay_style == "WSD" and s.lr_warmup_steps >= 2000 and s.anneal_peak_lr_fraction == 0.75
    assert (o.adam_beta1, o.adam_beta2, o.weight_decay) == (0.9, 0.95, 0.1)
    assert cfg.parallel.sequence_parallel and cfg.parallel.use_distributed_optimizer


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_fp8_gemm_shape_works_at_tp_up_to_8(tp):
    from hybrid_megatron.model.fp8_dims import MULTIPLE, first_problem, gemm_dims

    cfg = load_run_config(ROOT / CONFIG, [f"parallel.tensor_model_parallel_size={tp}",
                                          f"parallel.sequence_parallel={str(tp > 1).lower()}"])
    assert first_problem(cfg.model, tp, cfg.data) is None
    assert len(gemm_dims(cfg.model, tp)) == 6 and all(size % MULTIPLE == 0 for _, size in gemm_dims(cfg.model, tp))
