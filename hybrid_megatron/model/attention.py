"""Core attention for the non-Transformer-Engine spec: torch's fused SDPA (flash / memory-efficient).

megatron-core's local ``DotProductAttention`` materialises the S x S score matrix; this module keeps
its interface (it is a drop-in ``core_attention`` submodule of ``SelfAttention``) and calls
``torch.nn.functional.scaled_dot_product_attention``, which dispatches to FlashAttention-2 on Hopper
when no mask is given.

Shapes (megatron's sbhd layout): q_SBHD [s, b, heads, d], k/v_SBGD [s, b, groups, d] (GQA),
output [s, b, heads * d]. Packed sequences (``thd``) arrive as b = 1 with cu_seqlens; they run with
a block-diagonal causal mask (the memory-efficient kernel; flash has no mask input here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("the local attention spec does not support context parallelism")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"the local attention spec supports causal masks only, got {attn_mask_type}")
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the local attention spec")
        s, b, heads, d = query.shape
        # sbhd -> bhsd for SDPA
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        is_causal = True
        if packed_seq_params is not None:
            mask = _block_causal_mask(packed_seq_params.cu_seqlens_q, s, query.device)
            is_causal = False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def _block_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """Boolean [total, total] mask: causal and within the same packed document."""
    lengths = torch.diff(cu_seqlens.to(device=device, dtype=torch.long))
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    if doc.numel() < total:  # tokens past the last boundary form one more document
        doc = torch.cat([doc, doc.new_full((total - doc.numel(),), lengths.numel())])
    pos = torch.arange(total, device=device)
    return (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
