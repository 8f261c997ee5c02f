"""Our ``ModelConfig`` <-> Hugging Face NemotronH ``config.json``.

The HF config is written so that transformers computes what megatron computed:
  * ``time_step_min``: HF's Mamba mixer clamps softplus(dt) at ``(time_step_min, inf)`` and ignores
    ``time_step_limit``; megatron never clamps. We write the smallest normal float32 so the clamp is a
    no-op for every representable dt, while HF's random init (log of it) stays finite.
  * ``layer_norm_epsilon``: HF uses it for the block norms and the Mamba gated norm; megatron's gated norm
    is fixed at 1e-5, so export requires ``norm_epsilon == 1e-5`` (see ``checks``).
  * ``residual_in_fp32: false``: megatron adds residuals in the parameter dtype (no fp32 residual option
    is set by our trainer).
  * no biases, ``relu2`` non-gated MLP, no RoPE, untied ``lm_head``.
  * MoE layers: sigmoid scores (NemotronH's only router), top-k weights normalised (``norm_topk_prob``, as
    megatron always does for k > 1) times ``routed_scaling_factor``, one expert group, the shared expert
    ungated; the gate and its score-correction bias in fp32.
Both ``hybrid_override_pattern`` (transformers < 5.15 and NVIDIA's remote code) and ``layers_block_type``
(transformers >= 5.15) are written.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import ModelConfig
from hybrid_megatron.config_io import build
from hybrid_megatron.convert.checks import check_importable, hf_pattern
from hybrid_megatron.model import pattern as pat

FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny
_LAYER_TYPES = {pat.MAMBA: "linear_attention", pat.ATTENTION: "full_attention", pat.MLP: "mlp", pat.MOE: "moe"}
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


def to_hf_config(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    dtype: str,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_position_embeddings: int = 4096,
) -> dict[str, Any]:
    """The config.json dict of ``NemotronHForCausalLM`` for this (exportable) model."""
    flat = pat.layers(cfg.hybrid_layer_pattern)
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "dtype": DTYPE_NAMES[dtype],
        "torch_dtype": DTYPE_NAMES[dtype],
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "hybrid_override_pattern": flat,
        "layers_block_type": [_LAYER_TYPES[s] for s in flat],
        "num_hidden_layers": len(flat),
        "tie_word_embeddings": False,
        "layer_norm_epsilon": cfg.norm_epsilon,
        "residual_in_fp32": False,
        "initializer_range": cfg.init_method_std,
        # attention
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": max_position_embeddings,
        # MLP
        "intermediate_size": cfg.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        # Mamba-2
        "mamba_num_heads": cfg.num_mamba_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "n_groups": cfg.mamba_num_groups,
        "ssm_state_size": cfg.mamba_state_dim,
        "conv_kernel": cfg.mamba_conv_kernel,
        "chunk_size": cfg.mamba_chunk_size,
        "expand": cfg.mamba_expand,
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_proj_bias": False,
        "time_step_min": FLOAT32_TINY,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "time_step_limit": [0.0, float("inf")],
        "num_nextn_predict_layers": 0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        **_moe_fields(cfg),
    }


def _moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    if pat.MOE not in cfg.hybrid_layer_pattern:
        return {}
    return {"n_routed_experts": cfg.moe_num_experts, "num_experts_per_tok": cfg.moe_top_k,
            "moe_intermediate_size": cfg.expert_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_size, "moe_latent_size": None,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
            "routed_scaling_factor": cfg.moe_routed_scaling_factor or 1.0}


def model_config_from_hf(hf: dict[str, Any], *, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Our model section for an HF NemotronH config (after ``check_importable``)."""
    check_importable(hf)
    required = ("hidden_size", "intermediate_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim",
                "n_groups", "ssm_state_size", "conv_kernel", "chunk_size", "vocab_size")
    missing = [key for key in required if hf.get(key) is None]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}: not a complete NemotronH config")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    raw = {
        "hybrid_layer_pattern": hf_pattern(hf),
        "hidden_size": hidden,
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "num_attention_heads": heads,
        "num_query_groups": int(hf.get("num_key_value_heads") or heads),
        "kv_channels": int(hf.get("head_dim") or hidden // heads),
        "mamba_num_heads": int(hf["mamba_num_heads"]),
        "mamba_head_dim": int(hf["mamba_head_dim"]),
        "mamba_num_groups": int(hf["n_groups"]),
        "mamba_state_dim": int(hf["ssm_state_size"]),
        "mamba_conv_kernel": int(hf["conv_kernel"]),
        "mamba_chunk_size": int(hf["chunk_size"]),
        "mamba_expand": int(hf.get("expand", 2)),
        "normalization": "RMSNorm",
        "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "add_bias_linear": False,
        "activation": "squared_relu",
        "position_embedding_type": "none",
        "tie_embeddings": False,
        "vocab_size": int(hf["vocab_size"]),
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }
    if pat.MOE in raw["hybrid_layer_pattern"]:
        # NemotronH routes on sigmoid scores plus its correction bias: megatron's expert bias holds it exactly
        scale = float(hf.get("routed_scaling_factor") or 1.0)
        raw.update(moe_num_experts=int(hf["n_routed_experts"]), moe_top_k=int(hf["num_experts_per_tok"]),
                   moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
                   moe_shared_expert_size=int(hf["moe_shared_expert_intermediate_size"]),
                   moe_router_score_function="sigmoid", moe_expert_bias=True,
                   moe_routed_scaling_factor=None if scale == 1.0 else scale)
    try:
        return build(ModelConfig, raw, "model")
    except ConfigError as exc:
        raise ConfigError(f"the HF config maps to an invalid model section: {exc}") from None
