"""GPU: what one layer of each type keeps for its backward against the dry run's memory model (``model/memory.py``,
the activations legend), the way tests/test_gpu_ssm_state_passing.py checks the Mamba mixers.

A one-layer model of each symbol (the tiny recipe's sizes, TE spec, bf16 as training wraps it) runs one forward;
the storages autograd saves while that layer's forward runs are counted once each (a saved view keeps its whole
storage), the parameters left out. The layer's input is counted: the model charges it to the layer (the pre-norm
keeps it). FP8 off, no recompute, TP 1."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from gpu_helpers import init_single_process, tiny_config
from saved_storages import SavedStorages

pytestmark = pytest.mark.gpu

VOCAB, SEQ, ROWS = 257, 384, 2
FAMILIES = {
    "M": [],
    "*": [],
    "-": [],
    "G": ["model.gdn_key_head_dim=64", "model.gdn_value_head_dim=64"],
    "E": ["model.moe_num_experts=8", "model.moe_top_k=2", "model.moe_ffn_hidden_size=768",
          "model.moe_shared_expert_size=768"],
}


@pytest.fixture(scope="module")
def world():
    init_single_process()
    yield


def _layer_saved_bytes(model, forward) -> int:
    """Bytes of the storages saved for the backward while the model's one decoder layer runs its forward."""
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for chunk in model for m in chunk.modules() if isinstance(m, (MambaLayer, TransformerLayer))]
    assert len(layers) == 1, [type(m).__name__ for m in layers]
    saved = SavedStorages([p for chunk in model for p in chunk.parameters()])
    inside = contextlib.ExitStack()
    handles = [layers[0].register_forward_pre_hook(lambda *_: inside.enter_context(saved.hooks())),
               layers[0].register_forward_hook(lambda *_: inside.close())]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    print("\n".join(saved.listing()))  # what to match the model's terms against (pytest -s)
    return saved.bytes


@pytest.mark.parametrize("symbol", list(FAMILIES), ids=["mamba", "attention", "mlp", "gdn", "moe"])
def test_the_dry_run_counts_what_each_layer_type_keeps_for_its_backward(world, symbol):
    import torch

    from data_pipeline.loader import StepBatch
    from data_pipeline.packing import build_arrays
    from hybrid_megatron.model.memory import layer_activations
    from hybrid_megatron.training.setup import build_training_model
    from hybrid_megatron.training.step import split_micro_batches

    if symbol == "G":
        pytest.importorskip("fla.modules.convolution", reason="Gated DeltaNet needs flash-linear-attention 0.4")
    cfg = tiny_config(f"model.hybrid_layer_pattern='{symbol}'", "model.layer_spec=te",  # quoted: '-' is YAML
                      "data.reset_at_document_boundaries=false", *FAMILIES[symbol])
    model = build_training_model(cfg, VOCAB, SEQ)
    windows = np.random.default_rng(0).integers(0, VOCAB - 1, size=(ROWS, SEQ + 1)).astype(np.int64)
    arrays = build_arrays(windows, VOCAB - 1, reset=False, eod_mask_loss=False)
    batch = StepBatch(step=0, phase="pretrain", seq_len=SEQ, sources=["x"] * ROWS, hashes=[""] * ROWS,
                      tokens_by_source={"x": ROWS * SEQ}, **arrays)
    (mb,) = split_micro_batches(batch, ROWS, False, torch.cuda.current_device())

    def forward():
        model[0](mb.input_ids, mb.position_ids, attention_mask=None, labels=mb.labels, packed_seq_params=None)

    measured = _layer_saved_bytes(model, forward)
    modelled, _ = layer_activations(cfg.model, symbol, ROWS * SEQ, 1, 1, cfg.train.recompute)
    print(symbol, f"measured {measured:,} B, modelled {modelled:,.0f} B, ratio {measured / modelled:.3f}")
    assert abs(measured / modelled - 1) < 0.1, f"layer {symbol!r}: measured / modelled = {measured / modelled:.3f}"
