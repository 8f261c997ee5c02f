"""What a checkpoint must share with the model that loads it: everything that shapes the weights.

Pipeline cuts, the layer spec (TE and local write the same keys), init, the SSD chunk size, attention
windows and MoE routing (top-k, scores, capacity, loss) may change between save and load; a TP/PP/DP/EP
change is resharded by torch_dist.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.errors import ConfigError
from hybrid_megatron.config_io import build
from hybrid_megatron.model import pattern
from hybrid_megatron.model.config import ModelConfig


def _architecture(raw: dict) -> dict:
    """What shapes the weights, derived (``kv_channels: null`` and ``64`` are the same architecture)."""
    m = build(ModelConfig, raw, "model")
    return {
        "layers (pattern without cuts)": pattern.layers(m.hybrid_layer_pattern),
        "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_kv_heads,
        "kv_channels": m.head_dim,
        "mamba_num_heads": m.num_mamba_heads,
        "mamba_head_dim": m.mamba_head_dim,
        "mamba_num_groups": m.mamba_num_groups,
        "mamba_state_dim": m.mamba_state_dim,
        "mamba_conv_kernel": m.mamba_conv_kernel,
        "gdn_key_head_dim": m.gdn_key_head_dim,
        "gdn_value_head_dim": m.gdn_value_head_dim,
        "gdn_num_key_heads": m.num_gdn_key_heads,
        "gdn_num_value_heads": m.num_gdn_value_heads,
        "gdn_conv_kernel": m.gdn_conv_kernel,
        "moe_num_experts": m.moe_num_experts,
        "moe_ffn_hidden_size": m.expert_ffn_hidden_size,
        "moe_shared_expert_size": m.moe_shared_expert_size,
        "moe_expert_bias": m.moe_expert_bias,  # a stored buffer, there or not
        "normalization": m.normalization,
        "add_bias_linear": m.add_bias_linear,
        "activation": m.activation,
        "position_embedding_type": m.position_embedding_type,
        "tie_embeddings": m.tie_embeddings,
        "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
    }


def check_architecture(saved_model: dict, current_model: dict, path: Path) -> None:
    """Refuses a checkpoint whose model differs in anything that shapes the weights.

    Pipeline cuts, the layer spec (TE and local write the same keys), init and chunk size may change.
    """
    saved, current = _architecture(saved_model), _architecture(current_model)
    for key in saved:
        if saved[key] != current[key]:
            raise ConfigError(
                f"checkpoint {path} has a different architecture: model.{key}={saved[key]!r} there, "
                f"{current[key]!r} in this config"
            )
    if saved_model.get("vocab_size") and current_model.get("vocab_size"):
        if saved_model["vocab_size"] != current_model["vocab_size"]:
            raise ConfigError(
                f"checkpoint {path} has a different architecture: model.vocab_size={saved_model['vocab_size']} "
                f"there, {current_model['vocab_size']} in this config"
            )
