"""Model geometry: every parameter of every layer type, derived from ``ModelConfig`` in one place.

Each layer symbol of the pattern has one entry here: its parameters with their megatron names (the
Transformer Engine spec's names, which the local spec's checkpoints share), global shapes, the dimension
tensor parallelism splits, whether they stay fp32 in a bf16 run (the SSM-precision rule) and whether
they are GEMM weights (what FP8 runs and what the FLOPs counter charges 2 x elements per token).
Parameter counts (``flops.py``), the memory estimate (``memory.py``), the FP8 shape check
(``fp8_dims.py``) and the converter's expected checkpoint shapes (``convert/mapping.py``) all read it.

Adding a layer family means one more ``_<family>_layer`` function and an entry in ``_LAYERS``.

Legend: H hidden, D Mamba d_inner (heads x head dim), BC groups x state dim (rows of B and of C),
h Mamba heads, K conv kernel, q/kv attention query/key-value heads, hd head dim, F ffn hidden,
U MLP up-projection rows (2F when gated), V padded vocab; MoE: E experts, Fe expert width, S shared
expert width; Gated DeltaNet: QK = key heads x key head dim,
VD = value heads x value head dim, hv value heads, dv value head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig

# megatron's MambaMixer.sharded_state_dict stores in_proj and conv1d as per-component sub-keys
IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
CONV_PARTS = ("x", "B", "C")
SSM_FP32_NAMES = ("A_log", "D", "dt_bias")  # kept fp32 in training and in checkpoints
# megatron's GatedDeltaNet stores in_proj and conv1d as per-section sub-keys too
GDN_IN_PROJ_PARTS = ("query", "key", "value", "z", "beta", "alpha")
GDN_CONV_PARTS = ("query", "key", "value")
GDN_FP32_NAMES = ("A_log", "dt_bias")  # its decay and step parameters: the same SSM-precision rule


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter tensor of a layer (or of the model's ends)."""

    name: str  # megatron name below the layer, e.g. "mixer.in_proj.weight"
    shape: tuple[int, ...]  # global shape (all TP ranks together)
    tp_dim: int | None  # the dimension TP ranks split; None: every TP rank holds it whole
    fp32: bool = False  # stays fp32 in a bf16 run (SSM-precision rule)
    gemm: bool = False  # a GEMM weight: FP8 runs it, FLOPs count 2 per element per token
    parts: tuple[tuple[str, int], ...] = ()  # checkpoint sub-keys (suffix, rows along dim 0) when stored split
    expert: bool = False  # a routed expert's weight: split over expert-parallel ranks, used by top-k of E tokens

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True, slots=True)
class LayerGeometry:
    """The parameters of one layer type, and the GEMM widths TP shards (FP8 needs them to divide by 16)."""

    symbol: str
    params: tuple[Param, ...]
    sharded_gemm_dims: tuple[tuple[str, int], ...]  # (what, global size of a TP-split GEMM dimension)

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def replicated(self) -> int:
        """Elements every TP rank holds whole (pre-norms, row-parallel output biases)."""
        return sum(p.numel for p in self.params if p.tp_dim is None)

    @property
    def fp32(self) -> int:
        return sum(p.numel for p in self.params if p.fp32)

    @property
    def gemm(self) -> int:
        return sum(p.numel for p in self.params if p.gemm)

    @property
    def expert(self) -> int:
        """Elements of the routed experts (all experts; a token uses top-k of them)."""
        return sum(p.numel for p in self.params if p.expert)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


@dataclass(frozen=True, slots=True)
class MambaWidths:
    """The Mamba-2 mixer's widths: the one place its projection width is worked out."""

    d_inner: int
    bc: int  # groups x state dim
    heads: int

    @property
    def in_proj_parts(self) -> tuple[tuple[str, int], ...]:
        """Rows of in_proj, in megatron's order [z | x | B | C | dt]."""
        return tuple(zip(IN_PROJ_PARTS, (self.d_inner, self.d_inner, self.bc, self.bc, self.heads)))

    @property
    def conv_parts(self) -> tuple[tuple[str, int], ...]:
        """Channels of the depthwise conv1d, in order [x | B | C]."""
        return tuple(zip(CONV_PARTS, (self.d_inner, self.bc, self.bc)))

    @property
    def in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.bc + self.heads

    @property
    def conv(self) -> int:
        return self.d_inner + 2 * self.bc


@dataclass(frozen=True, slots=True)
class GdnWidths:
    """megatron's GatedDeltaNet widths: in_proj rows [q | k | v | z | beta | alpha], conv over [q | k | v]."""

    qk: int  # key heads x key head dim (rows of q, and of k)
    v: int  # value heads x value head dim (rows of v, and of the output gate z)
    value_heads: int

    @property
    def in_proj_parts(self) -> tuple[tuple[str, int], ...]:
        return tuple(zip(GDN_IN_PROJ_PARTS, (self.qk, self.qk, self.v, self.v, self.value_heads, self.value_heads)))

    @property
    def conv_parts(self) -> tuple[tuple[str, int], ...]:
        return tuple(zip(GDN_CONV_PARTS, (self.qk, self.qk, self.v)))

    @property
    def in_proj(self) -> int:
        return 2 * self.qk + 2 * self.v + 2 * self.value_heads

    @property
    def conv(self) -> int:
        return 2 * self.qk + self.v


def gdn_widths(m: ModelConfig) -> GdnWidths:
    return GdnWidths(qk=m.num_gdn_key_heads * m.gdn_key_head_dim, v=m.num_gdn_value_heads * m.gdn_value_head_dim,
                     value_heads=m.num_gdn_value_heads)


def mamba_widths(m: ModelConfig) -> MambaWidths:
    return MambaWidths(d_inner=m.mamba_d_inner, bc=m.mamba_num_groups * m.mamba_state_dim, heads=m.num_mamba_heads)


def attention_widths(m: ModelConfig) -> tuple[int, int]:
    """(rows of the fused QKV projection, input width of the output projection)."""
    return (m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim, m.num_attention_heads * m.head_dim


def mlp_up_rows(m: ModelConfig) -> int:
    return m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1)


def _pre_norm(m: ModelConfig, linear: str) -> tuple[Param, ...]:
    """A layer's pre-norm, which the TE spec fuses into its first linear (replicated over TP)."""
    H = m.hidden_size
    weight = Param(f"{linear}.layer_norm_weight", (H,), None)
    if m.normalization == "LayerNorm":
        return weight, Param(f"{linear}.layer_norm_bias", (H,), None)
    return (weight,)


def _linear_biases(m: ModelConfig, column: str, column_rows: int, row: str) -> tuple[Param, ...]:
    """With add_bias_linear: the column-parallel bias is split with its rows, the row-parallel one replicated."""
    if not m.add_bias_linear:
        return ()
    return Param(f"{column}.bias", (column_rows,), 0), Param(f"{row}.bias", (m.hidden_size,), None)


def _mamba_layer(m: ModelConfig) -> LayerGeometry:
    H, K, w = m.hidden_size, m.mamba_conv_kernel, mamba_widths(m)
    # megatron's MambaMixer has no linear biases (it asserts bias=False) whatever add_bias_linear says
    params = (
        *_pre_norm(m, "mixer.in_proj"),
        Param("mixer.in_proj.weight", (w.in_proj, H), 0, gemm=True, parts=w.in_proj_parts),  # [z|x|B|C|dt, H]
        Param("mixer.conv1d.weight", (w.conv, 1, K), 0, parts=w.conv_parts),
        Param("mixer.conv1d.bias", (w.conv,), 0, parts=w.conv_parts),
        *(Param(f"mixer.{name}", (w.heads,), 0, fp32=True) for name in SSM_FP32_NAMES),
        Param("mixer.norm.weight", (w.d_inner,), 0),  # gated RMSNorm over d_inner, split with the heads
        Param("mixer.out_proj.weight", (H, w.d_inner), 1, gemm=True),
    )
    return LayerGeometry(pat.MAMBA, params, (("the Mamba in_proj width", w.in_proj), ("the Mamba inner width", w.d_inner)))


def _gdn_layer(m: ModelConfig) -> LayerGeometry:
    H, K, w = m.hidden_size, m.gdn_conv_kernel, gdn_widths(m)
    # megatron builds GatedDeltaNet without linear or conv biases (its defaults; the hybrid spec passes none);
    # the gated output norm runs per value head, so every TP rank holds it whole
    out_norm = ("weight", "bias") if m.normalization == "LayerNorm" else ("weight",)
    params = (
        *_pre_norm(m, "self_attention.in_proj"),
        Param("self_attention.in_proj.weight", (w.in_proj, H), 0, gemm=True, parts=w.in_proj_parts),
        Param("self_attention.conv1d.weight", (w.conv, 1, K), 0, parts=w.conv_parts),
        *(Param(f"self_attention.{name}", (w.value_heads,), 0, fp32=True) for name in GDN_FP32_NAMES),
        *(Param(f"self_attention.out_norm.{n}", (m.gdn_value_head_dim,), None) for n in out_norm),
        Param("self_attention.out_proj.weight", (H, w.v), 1, gemm=True),
    )
    return LayerGeometry(pat.GDN, params, (("the Gated DeltaNet in_proj width", w.in_proj),
                                           ("the Gated DeltaNet value width", w.v)))


def _attention_layer(m: ModelConfig) -> LayerGeometry:
    H = m.hidden_size
    qkv, out = attention_widths(m)
    params = (
        *_pre_norm(m, "self_attention.linear_qkv"),
        Param("self_attention.linear_qkv.weight", (qkv, H), 0, gemm=True),  # rows per group [q_g | k_g | v_g]
        Param("self_attention.linear_proj.weight", (H, out), 1, gemm=True),
        *_linear_biases(m, "self_attention.linear_qkv", qkv, "self_attention.linear_proj"),
    )
    return LayerGeometry(pat.ATTENTION, params, (("the attention QKV width", qkv), ("the attention output width", out)))


def _mlp_layer(m: ModelConfig) -> LayerGeometry:
    H, F, U = m.hidden_size, m.ffn_hidden_size, mlp_up_rows(m)
    params = (
        *_pre_norm(m, "mlp.linear_fc1"),
        Param("mlp.linear_fc1.weight", (U, H), 0, gemm=True),
        Param("mlp.linear_fc2.weight", (H, F), 1, gemm=True),
        *_linear_biases(m, "mlp.linear_fc1", U, "mlp.linear_fc2"),
    )
    return LayerGeometry(pat.MLP, params, (("model.ffn_hidden_size", F),))


def _moe_layer(m: ModelConfig) -> LayerGeometry:
    """megatron's MoE layer (TE spec, grouped GEMM): an unfused pre-norm, the router (replicated over TP, its
    gating computed in fp32), one fc1/fc2 pair per expert and an optional shared expert."""
    H, E, Fe, S = m.hidden_size, m.moe_num_experts, m.expert_ffn_hidden_size, m.moe_shared_expert_size
    gated = 2 if m.activation == "swiglu" else 1
    norm = ("weight", "bias") if m.normalization == "LayerNorm" else ("weight",)
    params = [Param(f"pre_mlp_layernorm.{n}", (H,), None) for n in norm]
    params.append(Param("mlp.router.weight", (E, H), None, gemm=True))
    params += [Param(f"mlp.experts.linear_fc1.weight{j}", (gated * Fe, H), 0, gemm=True, expert=True) for j in range(E)]
    params += [Param(f"mlp.experts.linear_fc2.weight{j}", (H, Fe), 1, gemm=True, expert=True) for j in range(E)]
    dims = [("the expert width (model.moe_ffn_hidden_size)", Fe)]
    if S:
        params += [Param("mlp.shared_experts.linear_fc1.weight", (gated * S, H), 0, gemm=True),
                   Param("mlp.shared_experts.linear_fc2.weight", (H, S), 1, gemm=True)]
        dims.append(("model.moe_shared_expert_size", S))
    return LayerGeometry(pat.MOE, tuple(params), tuple(dims))


_LAYERS = {pat.MAMBA: _mamba_layer, pat.GDN: _gdn_layer, pat.ATTENTION: _attention_layer, pat.MLP: _mlp_layer,
           pat.MOE: _moe_layer}


def fp32_param_suffixes() -> frozenset[str]:
    """Names below a layer (e.g. ``mixer.A_log``) that the SSM-precision rule keeps fp32, for every layer type."""
    return frozenset({*(f"mixer.{n}" for n in SSM_FP32_NAMES), *(f"self_attention.{n}" for n in GDN_FP32_NAMES)})


def layer(m: ModelConfig, symbol: str) -> LayerGeometry:
    """The geometry of one layer of type ``symbol``."""
    try:
        return _LAYERS[symbol](m)
    except KeyError:
        raise ValueError(f"no geometry for layer symbol {symbol!r}") from None


def layers(m: ModelConfig) -> list[LayerGeometry]:
    """One entry per layer of the pattern (pipeline cuts removed), in order."""
    cache = {s: layer(m, s) for s in set(pat.layers(m.hybrid_layer_pattern))}
    return [cache[s] for s in pat.layers(m.hybrid_layer_pattern)]


def embedding(m: ModelConfig, padded_vocab: int) -> Param:
    return Param("embedding.word_embeddings.weight", (padded_vocab, m.hidden_size), 0)


def output_layer(m: ModelConfig, padded_vocab: int) -> Param:
    """The LM head (a separate tensor unless the embeddings are tied; then it only exists off the first stage)."""
    return Param("output_layer.weight", (padded_vocab, m.hidden_size), 0, gemm=True)


def final_norm(m: ModelConfig) -> tuple[Param, ...]:
    weight = Param("decoder.final_norm.weight", (m.hidden_size,), None)
    if m.normalization == "LayerNorm":
        return weight, Param("decoder.final_norm.bias", (m.hidden_size,), None)
    return (weight,)


def layer_key(index: int, name: str) -> str:
    """The model-level key of a layer parameter (layer indices are global: PP does not show)."""
    return f"decoder.layers.{index}.{name}"
