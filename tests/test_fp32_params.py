"""fp32 SSM parameters through megatron's bf16 wrap (model/fp32_params.py), on a CPU with a stand-in layer.

The real HybridModel runs the same check on the GPU (tests/test_gpu_model.py); here the restore logic
itself: exact fp32 values back, the same Parameter objects, everything else bf16, names matched only
inside a ``mixer``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from hybrid_megatron.model.fp32_params import is_ssm_fp32_param, ssm_fp32_params, wrap_half_keep_ssm_fp32


class Mixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # values bf16 cannot hold exactly
        self.A_log = torch.nn.Parameter(torch.log(torch.linspace(1.0, 16.0, 8)) + 1e-6)
        self.D = torch.nn.Parameter(torch.full((8,), 1.0 + 2**-12))
        self.dt_bias = torch.nn.Parameter(torch.linspace(-4.0, -2.0, 8) + 3e-5)
        self.in_proj = torch.nn.Linear(16, 16, bias=False)


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = Mixer()
        self.D = torch.nn.Parameter(torch.ones(4))  # not inside a mixer: an ordinary parameter


def test_ssm_params_come_back_fp32_exact_and_the_same_objects():
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, bf16=True)
    layer = Layer()
    before = {n: p.detach().clone() for n, p in ssm_fp32_params(layer).items()}
    objects = {n: id(p) for n, p in ssm_fp32_params(layer).items()}
    wrapped = wrap_half_keep_ssm_fp32(config, layer)
    inner = wrapped.module
    after = ssm_fp32_params(inner)
    assert sorted(after) == ["mixer.A_log", "mixer.D", "mixer.dt_bias"]
    for name, p in after.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[name]), name
        assert id(p) == objects[name]  # the optimizer and DDP see the very parameter the model uses
        assert p.to(torch.bfloat16).float().ne(before[name]).any(), "test values must not be bf16-exact"
    assert inner.mixer.in_proj.weight.dtype == torch.bfloat16
    assert inner.D.dtype == torch.bfloat16


def test_name_rule():
    assert is_ssm_fp32_param("decoder.layers.3.mixer.A_log")
    assert is_ssm_fp32_param("module.decoder.layers.0.mixer.dt_bias")
    assert not is_ssm_fp32_param("decoder.layers.0.mixer.in_proj.weight")
    assert not is_ssm_fp32_param("decoder.layers.0.self_attention.D")
