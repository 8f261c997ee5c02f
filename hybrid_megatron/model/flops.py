"""Exact parameter counts and FLOPs per token for hybrid patterns (our own counter).

megatron's counter assumes Mamba's d_inner = 2 * hidden and GPT-shaped layers; this one walks the
pattern and counts each layer from its real dimensions.

FLOPs convention (the usual MFU one): a matmul of [m, k] x [k, n] costs 2*m*k*n; training costs
3x the forward (backward = 2x forward); activation recompute is not counted (it is overhead, not
model FLOPs); causal attention scores and the SSD intra-chunk products count half the square.
Per token, with H hidden, S sequence length, V padded vocab:

  attention layer   2*H*(q + 2*kv)*hd  +  2*(q*hd)*H  +  2 * 2*q*hd*S/2            (QKV, proj, QK^T and AV)
                    (a sliding window of W keys: S/2 becomes W - W^2/(2S), the mean keys per query)
  mlp layer         2*H*F*(2 if gated else 1)  +  2*F*H
  mamba layer       2*H*(2*di + 2*G*N + nh)  +  2*di*H                              (in_proj, out_proj)
                    + 2*K*(di + 2*G*N)                                             (depthwise conv)
                    + 2*G*N*Q/2 + 2*di*Q/2                                          (SSD within a chunk of Q)
                    + 2*di*N + 2*di*N                                               (chunk states in and out)
  gdn layer         2*H*(2*QK + 2*VD + 2*hv)  +  2*VD*H                             (in_proj, out_proj)
                    + 2*K*(2*QK + VD)                                              (depthwise conv)
                    + hv * [C*(dk + dv) + C*(2*dk + dv) + 6*dk*dv]                  (flash-linear-attention's
                    chunked delta rule, chunk C = 64, per value head: causal scores and their product with
                    V inside a chunk (half the square); the WY transform's K K^T, A K and A V; reading,
                    correcting and updating the dk x dv state)
  moe layer         2*E*H  +  k * 2*H*Fe*(2 if gated else 1) + 2*Fe*H  +  the shared expert as an MLP of S
                    (the router, then only the k experts a token is routed to: FLOPs by active parameters)
  logits            2*H*V

Parameter shapes come from ``model/geometry.py``: a GEMM costs 2 x its weight's elements per token, and
only the mixing terms (conv, SSD, attention scores) are written out here.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_megatron.model import geometry as geo
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class LayerCost:
    params: int
    flops_per_token: int  # forward only
    active_params: int  # used by one token: all but the routed experts a token is not sent to


def mean_keys(seq_len: int, window: int | None) -> float:
    """Keys a query attends to on average over a causal sequence (the convention's S/2 without a window)."""
    if window is None or window >= seq_len:
        return seq_len / 2
    return window - window * window / (2 * seq_len)


GDN_CHUNK = 64  # flash-linear-attention's chunk size for the gated delta rule


def _mixing_flops(m: ModelConfig, symbol: str, seq_len: int, window: int | None = None) -> int:
    """Forward FLOPs per token outside the GEMMs (the GEMMs cost 2 x their weight elements)."""
    if symbol == pat.GDN:
        w, C = geo.gdn_widths(m), min(GDN_CHUNK, seq_len)
        dk, dv = m.gdn_key_head_dim, m.gdn_value_head_dim
        return 2 * m.gdn_conv_kernel * w.conv + w.value_heads * (C * (dk + dv) + C * (2 * dk + dv) + 6 * dk * dv)
    if symbol == pat.MAMBA:
        w = geo.mamba_widths(m)
        Q = min(m.mamba_chunk_size, seq_len)
        G, N = m.mamba_num_groups, m.mamba_state_dim
        return 2 * m.mamba_conv_kernel * w.conv + G * N * Q + w.d_inner * Q + 4 * w.d_inner * N
    if symbol == pat.ATTENTION:
        return round(4 * m.num_attention_heads * m.head_dim * mean_keys(seq_len, window))  # QK^T and AV
    return 0


def layer_cost(m: ModelConfig, symbol: str, seq_len: int, window: int | None = None) -> LayerCost:
    g = geo.layer(m, symbol)
    idle = 0
    if g.expert:  # every expert weight is a GEMM weight; a token uses k of the E experts
        idle = g.expert - g.expert * m.moe_top_k // m.moe_num_experts
    return LayerCost(g.total, 2 * (g.gemm - idle) + _mixing_flops(m, symbol, seq_len, window), g.total - idle)


def mamba_layer(m: ModelConfig, seq_len: int) -> LayerCost:
    return layer_cost(m, pat.MAMBA, seq_len)


def attention_layer(m: ModelConfig, seq_len: int) -> LayerCost:
    return layer_cost(m, pat.ATTENTION, seq_len)


def mlp_layer(m: ModelConfig) -> LayerCost:
    return layer_cost(m, pat.MLP, 1)


def _final_norm_params(m: ModelConfig) -> int:
    return sum(p.numel for p in geo.final_norm(m))


def embedding_params(m: ModelConfig, padded_vocab: int) -> int:
    return geo.embedding(m, padded_vocab).numel * (1 if m.tie_embeddings else 2)


def num_parameters(m: ModelConfig, padded_vocab: int) -> int:
    """Exactly the parameter count of the built model (all TP/PP shards together)."""
    layers = sum(g.total for g in geo.layers(m))
    return layers + embedding_params(m, padded_vocab) + _final_norm_params(m)


def active_parameters(m: ModelConfig, padded_vocab: int) -> int:
    """Parameters one token uses (MoE layers: the router, the shared expert and k routed experts)."""
    layers = sum(layer_cost(m, s, 1).active_params for s in pat.layers(m.hybrid_layer_pattern))
    return layers + embedding_params(m, padded_vocab) + _final_norm_params(m)


def stage_parameters(m: ModelConfig, padded_vocab: int, pp_size: int) -> list[int]:
    """Parameters held by each pipeline stage (embedding on the first, head and final norm on the last)."""
    out = []
    for stage in pat.split_stages(m.hybrid_layer_pattern, pp_size):
        n = sum(geo.layer(m, s).total for chunk in stage.chunks for s in chunk)
        if stage.pp_rank == 0:
            n += geo.embedding(m, padded_vocab).numel
        if stage.pp_rank == pp_size - 1:
            n += _final_norm_params(m)
            if not m.tie_embeddings or pp_size > 1:  # a tied head on another stage keeps a copy
                n += geo.output_layer(m, padded_vocab).numel
        out.append(n)
    return out


def forward_flops_per_token(m: ModelConfig, padded_vocab: int, seq_len: int) -> int:
    windowed = iter(m.windowed_attention())
    layers = 0
    for s in pat.layers(m.hybrid_layer_pattern):
        window = m.attention_window if s == pat.ATTENTION and next(windowed) else None
        layers += layer_cost(m, s, seq_len, window).flops_per_token
    return layers + 2 * geo.output_layer(m, padded_vocab).numel


def training_flops_per_token(m: ModelConfig, padded_vocab: int, seq_len: int) -> int:
    """Model FLOPs per trained token: forward + backward (2x), recompute excluded."""
    return 3 * forward_flops_per_token(m, padded_vocab, seq_len)
