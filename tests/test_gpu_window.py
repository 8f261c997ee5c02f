"""GPU: a windowed attention layer sees exactly its window (through TE, packed documents as in training), and
the tiny recipe trains with windows and one global layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpu_helpers import init_single_process, run_pretrain, tiny_config

pytestmark = pytest.mark.gpu
WINDOW = 64


@pytest.fixture(scope="module")
def world():
    init_single_process()


def test_a_token_outside_the_window_changes_nothing(world):
    import torch

    from data_pipeline.loader import StepBatch
    from data_pipeline.packing import build_arrays
    from hybrid_megatron.model.build import build_model_chunks
    from hybrid_megatron.training.setup import half_precision
    from hybrid_megatron.training.step import forward_step, split_micro_batches

    cfg = tiny_config("model.hybrid_layer_pattern=*-*-", f"model.attention_window={WINDOW}")
    model = half_precision(cfg, build_model_chunks(cfg, 257, 512)[0]).eval()
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, size=(2, 513)).astype(np.int64)

    def logits(w):
        arrays = build_arrays(w, 256, True, False)
        batch = StepBatch(step=0, phase="t", seq_len=512, sources=["x", "x"], hashes=["", ""],
                          tokens_by_source={"x": 1024}, **arrays)
        (mb,) = split_micro_batches(batch, 2, True, "cuda")
        with torch.no_grad():
            out, _ = forward_step(iter([mb]), model, logits=True)
        return out.float().reshape(2, 512, -1)

    base = logits(windows)
    changed = windows.copy()
    changed[:, 100] = (changed[:, 100] + 1) % 256
    after = logits(changed)
    diff = (after - base).abs().amax(dim=-1)  # [rows, positions]
    assert (diff[:, :100] == 0).all()  # causal
    assert (diff[:, 100:100 + WINDOW] > 0).any(dim=1).all()  # inside the window it is seen
    # two attention layers: the change reaches 2 x (WINDOW - 1) positions on, and no further
    assert (diff[:, 100 + 2 * (WINDOW - 1) + 1:] == 0).all()


def test_the_tiny_recipe_trains_with_windows_and_a_global_layer(tmp_path):
    run = tmp_path / "run"
    proc = run_pretrain(["configs/tiny.yaml", "model.attention_window=256", "model.global_attention_layers=[1]",
                         "train.train_steps=40", "schedule.lr_warmup_steps=5", f"logging.run_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(x)["loss"] for x in (run / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
