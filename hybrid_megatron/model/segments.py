"""Per-layer-type document boundaries for one forward pass: the mechanism behind the ``state`` suite's cuts.

megatron's hybrid stack hands every layer the same ``packed_seq_params`` (``cu_seqlens``: where documents
start; Mamba-2 and Gated DeltaNet derive their state resets from them, attention its causal segments).
``layer_overrides`` gives the Mamba, the Gated DeltaNet or the attention layers other boundaries for the
duration of a ``with`` block, through forward pre-hooks that replace that keyword argument, so that a memory
can be cut for one layer type while the others still see the whole document. Layers of other types (MLP, MoE) ignore the boundaries.
"""

from __future__ import annotations

import contextlib

LAYER_TYPES = ("mamba", "gdn", "attention")


def layer_type(module) -> str | None:
    """"mamba" for megatron's MambaLayer, "gdn" for a TransformerLayer around a GatedDeltaNet, "attention" for
    one with self-attention, else None."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if isinstance(module, MambaLayer):
        return "mamba"
    if not isinstance(module, TransformerLayer):
        return None
    mixer = getattr(module, "self_attention", None)
    if isinstance(mixer, GatedDeltaNet):
        return "gdn"
    return None if isinstance(mixer, IdentityOp) else "attention"


@contextlib.contextmanager
def layer_overrides(model, params: dict | None):
    """Within the block, layers of type ``t`` in ``model`` run with ``params[t]`` as their packed_seq_params."""
    if not params:
        yield
        return
    unknown = set(params) - set(LAYER_TYPES)
    if unknown:
        raise ValueError(f"layer types {sorted(unknown)}: known are {LAYER_TYPES}")
    handles = []

    def hook_for(p):
        def hook(_module, args, kwargs):
            return args, {**kwargs, "packed_seq_params": p}
        return hook

    try:
        for module in model.modules():
            kind = layer_type(module)
            if kind in params:
                handles.append(module.register_forward_pre_hook(hook_for(params[kind]), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
