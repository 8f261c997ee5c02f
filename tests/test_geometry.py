"""model/geometry.py against what megatron really built and saved, and the readers that derive from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrid_megatron.checkpoint import layout, offline
from hybrid_megatron.config import load_run_config
from hybrid_megatron.convert import mapping
from hybrid_megatron.model import flops, fp8_dims, geometry, memory
from hybrid_megatron.model import pattern as pat

FIXTURES = Path(__file__).parent / "fixtures" / "convert"


@pytest.mark.parametrize("fixture", ["tp1", "moe"])
def test_every_parameter_of_a_megatron_checkpoint_has_its_geometry_shape_and_dtype(fixture):
    """The fixtures were trained and saved by megatron-core (TE spec; ``moe`` with MoE layers and an expert bias):
    their stored keys, shapes and the fp32 SSM params must be exactly what the geometry says."""
    step_dir = layout.resolve_step_dir(FIXTURES / fixture / "ckpt")
    cfg = offline.load_model_config(step_dir)
    stored = {k: v for k, v in offline.CheckpointReader(step_dir).tensors.items() if mapping.is_model_key(k)}
    padded = stored["embedding.word_embeddings.weight"][0][0]
    assert {k: s for k, (s, _) in stored.items()} == mapping.expected_megatron_shapes(cfg, padded)
    fp32_names = {f"{geometry.layer_key(i, p.name)}" for i, g in enumerate(geometry.layers(cfg)) for p in g.params
                  if p.fp32}
    assert fp32_names and all(stored[k][1] == torch.float32 for k in fp32_names)
    # the fixture is an fp32 model: every parameter stored fp32; the count matches the dry run's
    buffers = [k for k in stored if k.endswith("router.expert_bias")]  # MoE routing state, not a parameter
    assert bool(buffers) == (fixture == "moe")
    assert sum(torch.Size(s).numel() for k, (s, _) in stored.items() if k not in buffers) == \
        flops.num_parameters(cfg, padded)


def _cfg(*overrides):
    return load_run_config("configs/tiny.yaml", list(overrides))


@pytest.mark.parametrize("overrides", [(), ("model.normalization=LayerNorm", "model.add_bias_linear=true"),
                                       ("model.activation=swiglu",)])
def test_layer_totals_split_into_replicated_and_tp_sharded(overrides):
    # every layer type in one pattern (MoE layers take no linear biases here)
    symbols = [s for s in pat.SUPPORTED_SYMBOLS if not (s == pat.MOE and "model.add_bias_linear=true" in overrides)]
    families = [f"model.hybrid_layer_pattern={''.join(symbols)}", "model.gdn_key_head_dim=64",
                "model.gdn_value_head_dim=64", *(["model.moe_num_experts=4"] if pat.MOE in symbols else [])]
    m = _cfg(*overrides, *families).model
    for symbol in symbols:
        g = geometry.layer(m, symbol)
        assert g.total == sum(p.numel for p in g.params)
        assert g.replicated == sum(p.numel for p in g.params if p.tp_dim is None)
        for p in g.params:
            assert p.tp_dim is None or p.tp_dim < len(p.shape)
            if p.parts:  # split sub-keys tile the first dimension exactly
                assert sum(rows for _, rows in p.parts) == p.shape[0]
    mamba = geometry.layer(m, pat.MAMBA)
    assert [p.name for p in mamba.params if p.fp32] == [f"mixer.{n}" for n in geometry.SSM_FP32_NAMES]
    # what tensor parallelism replicates: the pre-norms and (with biases) the row-parallel output bias
    norm = m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    assert geometry.layer(m, pat.ATTENTION).replicated == norm + (m.hidden_size if m.add_bias_linear else 0)


def test_mamba_width_is_one_number_for_flops_memory_fp8_and_the_converter():
    m = _cfg("model.mamba_num_groups=4", "model.mamba_state_dim=32").model
    w = geometry.mamba_widths(m)
    width = 2 * m.mamba_d_inner + 2 * 4 * 32 + m.num_mamba_heads  # [z | x | B | C | dt]
    assert w.in_proj == width == geometry.layer(m, pat.MAMBA).param("mixer.in_proj.weight").shape[0]
    assert sum(mapping.Dims.of(m).in_proj_sizes) == width
    assert (f"the Mamba in_proj width {width} / TP 2", width // 2) in fp8_dims.gemm_dims(m, 2)
    # FLOPs charge 2 per GEMM weight element: in_proj and out_proj
    cost = flops.layer_cost(m, pat.MAMBA, 1)
    assert cost.flops_per_token - 2 * (width * m.hidden_size + m.mamba_d_inner * m.hidden_size) > 0
    # the memory estimate's stored activations grow with that same width
    bigger = _cfg("model.mamba_num_groups=8", "model.mamba_state_dim=32")
    assert memory.estimate(bigger, 384, 1024, world_size=1)[0].activations > memory.estimate(
        _cfg("model.mamba_num_groups=4", "model.mamba_state_dim=32"), 384, 1024, world_size=1)[0].activations


def test_unknown_symbol_has_no_geometry():
    with pytest.raises(ValueError, match="no geometry for layer symbol 'D'"):
        geometry.layer(_cfg().model, "D")  # megatron's DeepSeek sparse attention: not a layer of this stack
