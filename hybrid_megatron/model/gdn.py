"""megatron-core's GatedDeltaNet as the hybrid stack's ``G`` layer, with SiLU as its activation.

megatron's GatedDeltaNet takes the activation of its short convolution and of its output gate from
``config.activation_func``, the model's MLP activation, and its fused kernels (flash-linear-attention's
causal conv1d) accept only SiLU: a hybrid with squared-ReLU MLPs (Nemotron-H's) would stop in the first
forward, and its deterministic path (torch's conv1d) would run squared ReLU where the kernels cannot. Every
Gated DeltaNet of record (the paper's, Qwen3-Next's, flash-linear-attention's layer) uses SiLU in both
places, so the ``G`` layer fixes it whatever the MLPs use; everything else is megatron's module unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.ssm.gated_delta_net import GatedDeltaNet


class SiluGatedDeltaNet(GatedDeltaNet):
    """megatron's GatedDeltaNet; its convolution and output gate use SiLU."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.act_fn, self.activation = F.silu, "silu"
