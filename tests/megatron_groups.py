"""A stand-in for a hybrid model's parameters and megatron-core's own grouping of them (CPU, gloo).

The parameter kinds that decide optimizer groups: fp32 SSM params inside a ``mixer`` (``A_log``, ``D``,
``dt_bias``), bf16 2-D weights, bf16 1-D norm weights and a bias.
"""

from __future__ import annotations

import torch


class Mixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.zeros(4))
        self.D = torch.nn.Parameter(torch.ones(4))
        self.dt_bias = torch.nn.Parameter(torch.zeros(4))
        self.in_proj = torch.nn.Linear(8, 8, bias=False).bfloat16()
        self.norm = torch.nn.LayerNorm(8, bias=False).bfloat16()


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = Mixer()


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(), Layer()])
        self.fc = torch.nn.Linear(8, 8).bfloat16()  # a 2-D weight (decayed) and a bias (not decayed)


def megatron_param_groups(model: torch.nn.Module, lr: float, min_lr: float, weight_decay: float) -> list[dict]:
    """megatron-core's ``_get_param_groups`` with our overrides (``training/optimizer.py``)."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from hybrid_megatron.checkpoint.offline import single_process_group
    from hybrid_megatron.training.optimizer import param_group_overrides

    config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, bf16=True,
                             params_dtype=torch.bfloat16)
    with single_process_group():
        return _get_param_groups([model], config, param_group_overrides(config))
