"""Exact parameter counts and FLOPs per token for hybrid patterns (our own counter).

megatron's counter assumes Mamba's d_inner = 2 * hidden and GPT-shaped layers; this one walks the
pattern and counts each layer from its real dimensions.

FLOPs convention (the usual MFU one): a matmul of [m, k] x [k, n] costs 2*m*k*n; training costs
3x the forward (backward = 2x forward); activation recompute is not counted (it is overhead, not
model FLOPs); causal attention scores and the SSD intra-chunk products count half the square.
Per token, with H hidden, S sequence length, V padded vocab:

  attention layer   2*H*(q + 2*kv)*hd  +  2*(q*hd)*H  +  2 * 2*q*hd*S/2            (QKV, proj, QK^T and AV)
  mlp layer         2*H*F*(2 if gated else 1)  +  2*F*H
  mamba layer       2*H*(2*di + 2*G*N + nh)  +  2*di*H                              (in_proj, out_proj)
                    + 2*K*(di + 2*G*N)                                             (depthwise conv)
                    + 2*G*N*Q/2 + 2*di*Q/2                                          (SSD within a chunk of Q)
                    + 2*di*N + 2*di*N                                               (chunk states in and out)
  logits            2*H*V
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_megatron.config import ModelConfig
from hybrid_megatron.model import pattern as pat


@dataclass(frozen=True, slots=True)
class LayerCost:
    params: int
    flops_per_token: int  # forward only


def _norm_params(m: ModelConfig, width: int) -> int:
    return width * (2 if m.normalization == "LayerNorm" else 1)


def mamba_layer(m: ModelConfig, seq_len: int) -> LayerCost:
    H, di, G, N, nh, K = (
        m.hidden_size, m.mamba_d_inner, m.mamba_num_groups, m.mamba_state_dim, m.num_mamba_heads, m.mamba_conv_kernel
    )
    Q = min(m.mamba_chunk_size, seq_len)
    in_width = 2 * di + 2 * G * N + nh
    conv_width = di + 2 * G * N
    # megatron's MambaMixer has no linear biases (it asserts bias=False) whatever add_bias_linear says
    params = _norm_params(m, H) + H * in_width + conv_width * K + conv_width + 3 * nh + di + di * H
    flops = 2 * H * in_width + 2 * di * H + 2 * K * conv_width + G * N * Q + di * Q + 4 * di * N
    return LayerCost(params, flops)


def attention_layer(m: ModelConfig, seq_len: int) -> LayerCost:
    H, hd, q, kv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_kv_heads
    qkv = (q + 2 * kv) * hd
    bias = qkv + H if m.add_bias_linear else 0
    params = _norm_params(m, H) + H * qkv + q * hd * H + bias
    flops = 2 * H * qkv + 2 * q * hd * H + 2 * q * hd * seq_len
    return LayerCost(params, flops)


def mlp_layer(m: ModelConfig) -> LayerCost:
    H, F = m.hidden_size, m.ffn_hidden_size
    up = F * (2 if m.activation == "swiglu" else 1)
    bias = up + H if m.add_bias_linear else 0
    return LayerCost(_norm_params(m, H) + H * up + F * H + bias, 2 * H * up + 2 * F * H)


def layer_cost(m: ModelConfig, symbol: str, seq_len: int) -> LayerCost:
    if symbol == pat.MAMBA:
        return mamba_layer(m, seq_len)
    if symbol == pat.ATTENTION:
        return attention_layer(m, seq_len)
    if symbol == pat.MLP:
        return mlp_layer(m)
    raise ValueError(f"no cost model for layer symbol {symbol!r}")


def embedding_params(m: ModelConfig, padded_vocab: int) -> int:
    return padded_vocab * m.hidden_size * (1 if m.tie_embeddings else 2)


def num_parameters(m: ModelConfig, padded_vocab: int) -> int:
    """Exactly the parameter count of the built model (all TP/PP shards together)."""
    layers = sum(layer_cost(m, s, 1).params for s in pat.layers(m.hybrid_layer_pattern))
    return layers + embedding_params(m, padded_vocab) + _norm_params(m, m.hidden_size)


def stage_parameters(m: ModelConfig, padded_vocab: int, pp_size: int) -> list[int]:
    """Parameters held by each pipeline stage (embedding on the first, head and final norm on the last)."""
    out = []
    for stage in pat.split_stages(m.hybrid_layer_pattern, pp_size):
        n = sum(layer_cost(m, s, 1).params for chunk in stage.chunks for s in chunk)
        if stage.pp_rank == 0:
            n += padded_vocab * m.hidden_size
        if stage.pp_rank == pp_size - 1:
            n += _norm_params(m, m.hidden_size)
            if not m.tie_embeddings or pp_size > 1:  # a tied head on another stage keeps a copy
                n += padded_vocab * m.hidden_size
        out.append(n)
    return out


def forward_flops_per_token(m: ModelConfig, padded_vocab: int, seq_len: int) -> int:
    layers = sum(layer_cost(m, s, seq_len).flops_per_token for s in pat.layers(m.hybrid_layer_pattern))
    return layers + 2 * m.hidden_size * padded_vocab


def training_flops_per_token(m: ModelConfig, padded_vocab: int, seq_len: int) -> int:
    """Model FLOPs per trained token: forward + backward (2x), recompute excluded."""
    return 3 * forward_flops_per_token(m, padded_vocab, seq_len)
