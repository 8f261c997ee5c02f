"""HybridStack for the non-TE spec: megatron-core builds its final norm as a TENorm unconditionally.

The subclass builds the stack without that norm and adds a torch RMSNorm/LayerNorm under the same
attribute name, so the forward pass and the checkpoint key (``decoder.final_norm.weight``) are
unchanged.
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class LocalHybridStack(HybridStack):
    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = WrappedTorchNorm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )
