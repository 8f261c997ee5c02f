"""The ``model:`` section of a run config: what the network is (layer pattern and sizes), not how it is
sharded or trained. Its derived sizes (head dims, Mamba widths) are properties here; every parameter's
shape lives in ``model/geometry.py``, which reads this config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data_pipeline.errors import ConfigError
from hybrid_megatron.model import pattern as pat


MAX_WIDTH = 1 << 20  # far above any model trained today; a larger width is a typo, not a plan


def positive(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}={value}: must be > 0")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    hybrid_layer_pattern: str
    """Layers as symbols: M Mamba-2, G Gated DeltaNet, * attention, - MLP, E MoE; | cuts pipeline segments."""
    hidden_size: int
    ffn_hidden_size: int
    """Width of the MLP layers' hidden activation."""
    num_attention_heads: int
    num_query_groups: int | None = None
    """GQA key/value groups; None for multi-head attention."""
    kv_channels: int | None = None
    """Attention head dim; None for hidden_size // num_attention_heads."""
    mamba_num_heads: int | None = None
    """Mamba-2 heads; None for mamba_expand * hidden_size // mamba_head_dim."""
    mamba_head_dim: int = 64
    mamba_num_groups: int = 8
    """B/C groups (the SSD analogue of GQA)."""
    mamba_state_dim: int = 128
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_expand: int = 2
    gdn_key_head_dim: int = 128
    """Gated DeltaNet (``G``): query/key head dim."""
    gdn_value_head_dim: int = 128
    """Gated DeltaNet: value (and output-gate) head dim."""
    gdn_num_key_heads: int | None = None
    """Gated DeltaNet query/key heads; None for hidden_size // gdn_key_head_dim (Qwen3-Next's proportions)."""
    gdn_num_value_heads: int | None = None
    """Gated DeltaNet value heads, a multiple of the key heads; None for 2 * hidden_size // gdn_value_head_dim."""
    gdn_conv_kernel: int = 4
    """Gated DeltaNet: width of the causal depthwise convolution over q, k and v."""
    moe_num_experts: int | None = None
    """MoE (``E``) layers: routed experts per layer (required with ``E``)."""
    moe_top_k: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """Width of each expert's hidden activation; None for ffn_hidden_size."""
    moe_shared_expert_size: int | None = None
    """Width of a shared expert every token passes through (Nemotron-H/DeepSeek style); None for none."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "sigmoid"
    """Router scores: sigmoid (Nemotron-H, DeepSeek-V3; exportable) or softmax (Mixtral)."""
    moe_aux_loss_coeff: float = 1e-2
    """Load-balancing loss coefficient (megatron's aux_loss); 0 turns the loss off."""
    moe_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias on the routing scores, updated from the load (DeepSeek-V3)."""
    moe_capacity_factor: float | None = None
    """None: dropless (every routed token is computed). A factor caps each expert at factor x its fair share of
    tokens and drops the rest (counted in the logs)."""
    moe_routed_scaling_factor: float | None = None
    """Multiplier on the routed experts' weights (Nemotron-H's routed_scaling_factor); None for 1."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    add_bias_linear: bool = False
    activation: Literal["squared_relu", "swiglu", "gelu"] = "squared_relu"
    position_embedding_type: Literal["none", "rope"] = "none"
    rotary_base: int = 10000
    tie_embeddings: bool = False
    vocab_size: int | None = None
    """Tokenizer vocabulary; None to take it from the data sources' stats.json."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the TP size (megatron's rule)."""
    init_method_std: float = 0.02
    layer_spec: Literal["auto", "te", "local"] = "auto"
    """te: Transformer Engine layers; local: megatron parallel layers + torch SDPA attention; auto: te if it imports."""
    attention_window: int | None = None
    """Sliding-window attention: each token attends to itself and the ``attention_window - 1`` tokens before it
    (within its document). None: full causal attention in every attention layer."""
    global_attention_layers: list[int] | None = None
    """With ``attention_window``: the attention layers (0-based, counted among the pattern's attention layers)
    that keep full attention, e.g. [0, 3, 7] for the first, a middle and the last of eight (Hymba)."""
    attention_backend: Literal["auto", "flash", "fused", "unfused"] = "auto"
    """TE's attention kernel family (megatron's ``--attention-backend``): auto lets TE pick per call (cuDNN
    fused attention on Hopper); deterministic runs with packed documents pick flash/unfused themselves.
    Megatron sets TE's NVTE_*_ATTN switches from it: leave those unset in the environment."""

    def __post_init__(self) -> None:
        pat.validate_pattern(self.hybrid_layer_pattern)
        positive(
            "model",
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            mamba_num_heads=self.mamba_num_heads,
            mamba_head_dim=self.mamba_head_dim,
            mamba_num_groups=self.mamba_num_groups,
            mamba_state_dim=self.mamba_state_dim,
            mamba_conv_kernel=self.mamba_conv_kernel,
            mamba_chunk_size=self.mamba_chunk_size,
            mamba_expand=self.mamba_expand,
            gdn_key_head_dim=self.gdn_key_head_dim,
            gdn_value_head_dim=self.gdn_value_head_dim,
            gdn_num_key_heads=self.gdn_num_key_heads,
            gdn_num_value_heads=self.gdn_num_value_heads,
            gdn_conv_kernel=self.gdn_conv_kernel,
            moe_num_experts=self.moe_num_experts,
            moe_top_k=self.moe_top_k,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_size=self.moe_shared_expert_size,
            moe_capacity_factor=self.moe_capacity_factor,
            moe_routed_scaling_factor=self.moe_routed_scaling_factor,
            vocab_size=self.vocab_size,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
            init_method_std=self.init_method_std,
        )
        for name in ("hidden_size", "ffn_hidden_size", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value > MAX_WIDTH * (8 if name == "vocab_size" else 1):
                raise ConfigError(f"model.{name}={value}: implausibly large (at most "
                                  f"{MAX_WIDTH * (8 if name == 'vocab_size' else 1):,}); a typo?")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups={self.num_query_groups} does not divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}: set model.kv_channels"
            )
        if self.mamba_num_heads is None and (self.mamba_expand * self.hidden_size) % self.mamba_head_dim:
            raise ConfigError(
                f"model.mamba_head_dim={self.mamba_head_dim} does not divide mamba_expand * hidden_size = "
                f"{self.mamba_expand * self.hidden_size}: set model.mamba_num_heads"
            )
        self._check_window()
        self._check_gdn()
        self._check_moe()
        if self.num_mamba_heads % self.mamba_num_groups:
            raise ConfigError(
                f"model.mamba_num_groups={self.mamba_num_groups} does not divide the "
                f"{self.num_mamba_heads} Mamba heads"
            )

    def _check_window(self) -> None:
        if self.attention_window is None:
            if self.global_attention_layers is not None:
                raise ConfigError("model.global_attention_layers needs model.attention_window (the window of the others)")
            return
        positive("model", attention_window=self.attention_window)
        if self.layer_spec == "local":
            raise ConfigError("model.attention_window needs Transformer Engine's attention (model.layer_spec: te or "
                              "auto); the local spec's attention is full")
        attention = pat.layers(self.hybrid_layer_pattern).count(pat.ATTENTION)
        if attention == 0:
            raise ConfigError("model.attention_window: the pattern has no attention layer ('*')")
        chosen = self.global_attention_layers or []
        if not isinstance(chosen, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in chosen):
            raise ConfigError(f"model.global_attention_layers={chosen!r}: expected a list of attention-layer indices")
        bad = [i for i in chosen if not 0 <= i < attention]
        if bad or len(set(chosen)) != len(chosen):
            raise ConfigError(f"model.global_attention_layers={chosen}: indices must be distinct and in [0, {attention}) "
                              f"(the pattern has {attention} attention layers)")

    def _check_gdn(self) -> None:
        if pat.GDN not in self.hybrid_layer_pattern:
            return
        if self.gdn_num_key_heads is None and self.hidden_size % self.gdn_key_head_dim:
            raise ConfigError(f"model.gdn_key_head_dim={self.gdn_key_head_dim} does not divide model.hidden_size="
                              f"{self.hidden_size}: set model.gdn_num_key_heads")
        if self.gdn_num_value_heads is None and (2 * self.hidden_size) % self.gdn_value_head_dim:
            raise ConfigError(f"model.gdn_value_head_dim={self.gdn_value_head_dim} does not divide 2 * hidden_size = "
                              f"{2 * self.hidden_size}: set model.gdn_num_value_heads")
        if self.num_gdn_key_heads == 0 or self.num_gdn_value_heads % self.num_gdn_key_heads:
            raise ConfigError(f"Gated DeltaNet: {self.num_gdn_value_heads} value heads are not a multiple of "
                              f"{self.num_gdn_key_heads} key heads (model.gdn_num_value_heads / gdn_num_key_heads)")

    def _check_moe(self) -> None:
        has_moe = pat.MOE in self.hybrid_layer_pattern
        if not has_moe:
            if self.moe_num_experts is not None:
                raise ConfigError("model.moe_num_experts is set but model.hybrid_layer_pattern has no MoE layer ('E')")
            return
        if self.moe_num_experts is None:
            raise ConfigError("model.hybrid_layer_pattern has MoE layers ('E'): set model.moe_num_experts (and "
                              "model.moe_top_k, default 2)")
        if not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ConfigError(f"model.moe_top_k={self.moe_top_k}: must lie in [1, model.moe_num_experts="
                              f"{self.moe_num_experts}]")
        if self.moe_aux_loss_coeff < 0:
            raise ConfigError(f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff}: must be >= 0")
        if self.moe_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ConfigError("model.moe_expert_bias=true needs model.moe_router_score_function=sigmoid (megatron's "
                              "expert bias shifts sigmoid scores)")
        if self.layer_spec == "local":
            raise ConfigError("MoE layers ('E') need Transformer Engine's grouped GEMM: model.layer_spec=local "
                              "cannot build them")
        if self.add_bias_linear:
            raise ConfigError("MoE layers ('E') are built without linear biases here: set model.add_bias_linear=false")

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def windowed_attention(self) -> list[bool]:
        """Per attention layer in pattern order: True when it attends within the window."""
        attention = pat.layers(self.hybrid_layer_pattern).count(pat.ATTENTION)
        if self.attention_window is None:
            return [False] * attention
        chosen = set(self.global_attention_layers or [])
        return [i not in chosen for i in range(attention)]

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def num_mamba_heads(self) -> int:
        return self.mamba_num_heads or self.mamba_expand * self.hidden_size // self.mamba_head_dim

    @property
    def mamba_d_inner(self) -> int:
        return self.num_mamba_heads * self.mamba_head_dim

    @property
    def num_gdn_key_heads(self) -> int:
        return self.gdn_num_key_heads or self.hidden_size // self.gdn_key_head_dim

    @property
    def num_gdn_value_heads(self) -> int:
        return self.gdn_num_value_heads or 2 * self.hidden_size // self.gdn_value_head_dim

    @property
    def num_layers(self) -> int:
        return len(pat.layers(self.hybrid_layer_pattern))
