"""What a model keeps per sequence at inference: the attention layers' keys and values, which grow with the
context (up to the window in a sliding-window layer), and the recurrent layers' convolution and SSM states,
which do not. This is what hybrids, windows and fewer attention layers buy at long context.

Per attention layer and cached token: 2 (K and V) x KV heads x head dim values. Per Mamba layer: the SSM
state, heads x head dim x state dim, and the convolution state, (d_inner + 2 x groups x state) x
(kernel - 1). Per Gated DeltaNet layer: the delta-rule state, value heads x key head dim x value head dim,
and the convolution state, (2 x key width + value width) x (kernel - 1). Every value is counted at
``bytes_per_value`` (2: bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_megatron.model import geometry as geo
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig

CONTEXTS = (32 * 1024, 128 * 1024)


@dataclass(frozen=True, slots=True)
class CacheBytes:
    attention: int
    mamba: int
    gdn: int = 0

    @property
    def total(self) -> int:
        return self.attention + self.mamba + self.gdn


def kv_bytes_per_token(m: ModelConfig, bytes_per_value: int = 2) -> int:
    """Keys and values of one token in one attention layer."""
    return 2 * m.num_kv_heads * m.head_dim * bytes_per_value


def mamba_state_bytes(m: ModelConfig, bytes_per_value: int = 2) -> int:
    """Convolution and SSM state of one Mamba layer (independent of the context)."""
    w = geo.mamba_widths(m)
    return (w.d_inner * m.mamba_state_dim + w.conv * (m.mamba_conv_kernel - 1)) * bytes_per_value


def gdn_state_bytes(m: ModelConfig, bytes_per_value: int = 2) -> int:
    """Convolution and delta-rule state of one Gated DeltaNet layer (independent of the context)."""
    w = geo.gdn_widths(m)
    return (w.value_heads * m.gdn_key_head_dim * m.gdn_value_head_dim + w.conv * (m.gdn_conv_kernel - 1)) * bytes_per_value


def cache_bytes(m: ModelConfig, context: int, bytes_per_value: int = 2) -> CacheBytes:
    """The cache of one sequence of ``context`` tokens."""
    windowed = m.windowed_attention()
    per_token = kv_bytes_per_token(m, bytes_per_value)
    attention = sum(per_token * (min(context, m.attention_window) if w else context) for w in windowed)
    flat = pat.layers(m.hybrid_layer_pattern)
    return CacheBytes(attention=attention, mamba=flat.count(pat.MAMBA) * mamba_state_bytes(m, bytes_per_value),
                      gdn=flat.count(pat.GDN) * gdn_state_bytes(m, bytes_per_value))


def cache_lines(m: ModelConfig) -> list[str]:
    """The dry run's section: growth per token, and the cache at 32k and 128k tokens."""
    windowed = m.windowed_attention()
    full = windowed.count(False)
    growth = full * kv_bytes_per_token(m)
    attn = f"{len(windowed)} attention layers" + (f" ({len(windowed) - full} with a {m.attention_window}-token window)"
                                                  if m.attention_window else "")
    flat = pat.layers(m.hybrid_layer_pattern)
    recurrent = f"{flat.count(pat.MAMBA)} Mamba layers" + (f", {flat.count(pat.GDN)} Gated DeltaNet layers"
                                                          if pat.GDN in flat else "")
    lines = [f"bf16; {attn}, {recurrent}",
             f"grows {growth:,} bytes per token of context ({full} full-attention layers x "
             f"{kv_bytes_per_token(m):,} bytes of K and V)" if full else
             f"constant past {m.attention_window or 0} tokens (no full-attention layer)"]
    for context in CONTEXTS:
        c = cache_bytes(m, context)
        gdn = f", Gated DeltaNet state {_size(c.gdn)}" if c.gdn else ""
        lines.append(f"at {context // 1024}k tokens: {_size(c.total)} per sequence (attention {_size(c.attention)}, "
                     f"Mamba state {_size(c.mamba)}{gdn})")
    return lines


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
