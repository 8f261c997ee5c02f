"""GPU: MoE (``E``) layers, megatron-core's MoE (top-k router in fp32, grouped-GEMM experts, shared expert)
built from our spec: exact parameter count, router statistics in the training log, the tiny recipe trained
in bf16 and FP8, capacity drops counted, and a deterministic resume bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpu_helpers import init_single_process, losses, run_pretrain, straight_and_resumed, tiny_config

pytestmark = pytest.mark.gpu
pytest.importorskip("transformer_engine.pytorch", reason="MoE layers need Transformer Engine's grouped GEMM")

MOE = ["model.hybrid_layer_pattern=MEM*E|MEM*E", "model.moe_num_experts=8", "model.moe_top_k=2",
       "model.moe_ffn_hidden_size=768", "model.moe_shared_expert_size=768"]
VOCAB, SEQ = 257, 384


@pytest.fixture(scope="module")
def world():
    init_single_process()


def _router_lines(text: str) -> list[dict]:
    """The router statistics of each training log line."""
    out = []
    for line in text.splitlines():
        if "moe_load_imbalance" not in line:
            continue
        fields = dict(part.strip().split(" ", 1) for part in line.split("|") if part.strip().startswith("moe_"))
        out.append({k: float(v) for k, v in fields.items()})
    return out


def test_parameter_count_and_names_match_the_geometry(world):
    from hybrid_megatron.model import geometry
    from hybrid_megatron.model.build import build_model_chunks, padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters

    cfg = tiny_config(*MOE)
    (chunk,) = build_model_chunks(cfg, VOCAB, SEQ)
    assert sum(p.numel() for p in chunk.parameters()) == num_parameters(cfg.model, padded_vocab_size(VOCAB, cfg.model, 1))
    shapes = {n.removeprefix("decoder.layers.1."): tuple(p.shape) for n, p in chunk.named_parameters()
              if n.startswith("decoder.layers.1.")}
    assert shapes == {p.name: p.shape for p in geometry.layer(cfg.model, "E").params}


@pytest.mark.parametrize("extra", [[], ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"],
                                   ["model.moe_capacity_factor=1.0"]], ids=["bf16", "fp8", "capacity"])
def test_the_tiny_recipe_trains_and_logs_router_statistics(tmp_path, extra):
    run = tmp_path / "run"
    proc = run_pretrain(["configs/tiny.yaml", *MOE, *extra, "train.train_steps=40", "schedule.lr_warmup_steps=5",
                         "logging.log_interval=10", f"logging.run_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    trained = list(losses(run).values())
    assert len(trained) == 40 and np.isfinite(trained).all() and np.mean(trained[-5:]) < np.mean(trained[:5]) - 0.5
    stats = _router_lines(proc.stdout + proc.stderr)
    print(json.dumps({"extra": extra, "router": stats}))
    assert len(stats) == 4
    for row in stats:
        assert row["moe_load_imbalance"] >= 1.0 and row["moe_aux_loss"] > 0
        # dropless unless a capacity factor is set; with factor 1.0 an uneven router overflows some expert
        assert (row["moe_dropped"] > 0) if extra == ["model.moe_capacity_factor=1.0"] else row["moe_dropped"] == 0


def test_a_deterministic_resume_repeats_the_straight_run(tmp_path):
    steps = 30
    a, b = straight_and_resumed(["configs/tiny.yaml", *MOE, "train.deterministic=true", "schedule.lr_warmup_steps=5",
                                 "logging.log_interval=5", "train.eval_interval=null", "checkpoint.save_interval=null"],
                                tmp_path, steps)
    differing = [s for s in range(steps // 2 + 1, steps + 1) if a[s] != b[s]]
    print(json.dumps({"bitwise": not differing, "differing_steps": differing}))
    assert not differing, f"resumed losses differ from the straight run's at steps {differing[:5]}"
