"""What can go to (and come from) NemotronH, checked before anything is written.

Each blocking problem is one line naming the option; all of a model's problems are reported together
in one ``ConfigError`` (exit 2). Differences that only shift numerics slightly and that the user may
accept (an HF model trained with HF's dt clamp, say) are logged as warnings on import, never dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from data_pipeline.errors import ConfigError
from hybrid_megatron.model import pattern as pat

if TYPE_CHECKING:
    from hybrid_megatron.config import ModelConfig

log = logging.getLogger(__name__)

MEGATRON_GATED_NORM_EPS = 1e-5  # MambaMixer builds its gated RMSNorm with eps=1e-5, whatever the config says
EXPORTABLE_SYMBOLS = (pat.MAMBA, pat.ATTENTION, pat.MLP, pat.MOE)
# why no transformers class holds a Gated DeltaNet hybrid of this stack (checked against transformers 5.25):
# qwen3_next's GatedDeltaNet computes what megatron's does, but not its other layers
GDN_NO_CLASS = ("Gated DeltaNet layers ('G') have no exact transformers class: qwen3_next's delta rule matches "
                "megatron's, but its attention layers add per-head q/k RMSNorms and a sigmoid output gate and its "
                "decoder layers pair every mixer with a SwiGLU MLP; olmo_hybrid's attention is post-norm with q/k "
                "norms")


def export_problems(cfg: ModelConfig) -> list[str]:
    """Every reason this model cannot be written as NemotronH, one line each (empty: exportable)."""
    problems = []
    if cfg.normalization != "RMSNorm":
        problems.append(f"normalization={cfg.normalization}: NemotronH uses RMSNorm")
    if cfg.add_bias_linear:
        problems.append("add_bias_linear=true: NemotronH's linear layers have no bias")
    if cfg.activation != "squared_relu":
        gated = " (gated)" if cfg.activation == "swiglu" else ""
        problems.append(f"activation={cfg.activation}{gated}: NemotronH's MLP is non-gated relu2 (squared_relu)")
    if cfg.position_embedding_type != "none":
        problems.append(f"position_embedding_type={cfg.position_embedding_type}: NemotronH has no RoPE")
    if cfg.tie_embeddings:
        problems.append("tie_embeddings=true: NemotronH keeps embeddings and lm_head separate")
    if cfg.attention_window is not None:
        problems.append(f"attention_window={cfg.attention_window}: NemotronH's attention layers attend to the whole "
                        "context (no sliding window)")
    for pos, symbol in enumerate(pat.layers(cfg.hybrid_layer_pattern)):
        if symbol == pat.GDN:
            problems.append(f"hybrid_layer_pattern: layer {pos}: {GDN_NO_CLASS}")
            break
        if symbol not in EXPORTABLE_SYMBOLS:
            name = pat.LAYER_SYMBOLS.get(symbol, "unknown")
            problems.append(f"hybrid_layer_pattern: symbol {symbol!r} ({name}) at layer {pos} has no NemotronH mapping")
            break
    problems += _moe_export_problems(cfg)
    has_mamba = pat.MAMBA in cfg.hybrid_layer_pattern
    if has_mamba and cfg.norm_epsilon != MEGATRON_GATED_NORM_EPS:
        problems.append(
            f"norm_epsilon={cfg.norm_epsilon}: NemotronH uses one epsilon for the block norms and the Mamba gated "
            f"norm, which megatron fixes at {MEGATRON_GATED_NORM_EPS}"
        )
    return problems


def _moe_export_problems(cfg: ModelConfig) -> list[str]:
    """What NemotronH's moe layer cannot hold (its router is sigmoid top-k with normalised weights, and it
    always has an ungated shared expert)."""
    if pat.MOE not in cfg.hybrid_layer_pattern:
        return []
    problems = []
    if cfg.moe_router_score_function != "sigmoid":
        problems.append(f"moe_router_score_function={cfg.moe_router_score_function}: NemotronH's router scores with "
                        "a sigmoid")
    if cfg.moe_top_k == 1:
        problems.append("moe_top_k=1: NemotronH normalises the top-k weights (a lone expert gets weight 1), "
                        "megatron keeps the raw score at k=1")
    if not cfg.moe_shared_expert_size:
        problems.append("moe_shared_expert_size unset: NemotronH's MoE layers always have a shared expert")
    return problems


def hf_cuda_conv_problem(cfg: ModelConfig) -> str | None:
    """Why the exported model cannot run on transformers' CUDA path with causal-conv1d installed, or None.

    transformers' NemotronH mixer hands causal-conv1d a column slice of the in_proj output, transposed (no
    copy): the row stride is the in_proj width, and causal-conv1d's channel-last kernel refuses strides that
    are not multiples of 8 ("causal_conv1d with channel last layout requires strides ... to be multiples of
    8"). Measured: hidden 384 with 12 Mamba heads (width 1804) fails; 256 and 512 (1288, 2320) run."""
    if pat.MAMBA not in pat.layers(cfg.hybrid_layer_pattern):
        return None
    from hybrid_megatron.model.geometry import mamba_widths

    w = mamba_widths(cfg)
    width = 2 * w.d_inner + 2 * w.bc + w.heads
    if width % 8 == 0:
        return None
    return (f"the Mamba in_proj width 2*d_inner + 2*groups*state + heads = {width} is not a multiple of 8: "
            "transformers' NemotronH passes causal-conv1d a strided view of it that its CUDA kernel refuses; "
            "pick a number of Mamba heads that makes the width a multiple of 8, or run the exported model "
            "where causal-conv1d is not installed (transformers' torch path)")


def check_exportable(cfg: ModelConfig) -> None:
    problems = export_problems(cfg)
    if problems:
        raise ConfigError("cannot export to NemotronH: " + "; ".join(problems))


_HF_LAYER_SYMBOLS = {"linear_attention": pat.MAMBA, "full_attention": pat.ATTENTION, "mlp": pat.MLP, "moe": pat.MOE}


def hf_pattern(hf: dict[str, Any]) -> str:
    """The layer pattern of an HF NemotronH config (``hybrid_override_pattern`` or ``layers_block_type``)."""
    if hf.get("layers_block_type"):
        types = hf["layers_block_type"]
        unknown = sorted({t for t in types if t not in _HF_LAYER_SYMBOLS})
        if unknown:
            raise ConfigError(f"layers_block_type: unknown layer type {unknown[0]!r}")
        return "".join(_HF_LAYER_SYMBOLS[t] for t in types)
    if hf.get("hybrid_override_pattern"):
        return str(hf["hybrid_override_pattern"])
    raise ConfigError("config.json has neither hybrid_override_pattern nor layers_block_type")


def import_problems(hf: dict[str, Any]) -> list[str]:
    """Every reason an HF NemotronH config cannot become our megatron model, one line each."""
    problems = []
    if hf.get("model_type") != "nemotron_h":
        problems.append(f"model_type={hf.get('model_type')!r}: only nemotron_h converts")
        return problems
    pattern = hf_pattern(hf)
    for pos, symbol in enumerate(pattern):
        if symbol not in EXPORTABLE_SYMBOLS:
            problems.append(f"hybrid_override_pattern: symbol {symbol!r} at layer {pos} has no megatron layer here")
            break
    if pat.MOE in pattern:
        problems += _moe_import_problems(hf)
    wanted = {
        "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu",
        "use_bias": False,
        "mamba_proj_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "use_conv_bias": True,
        "tie_word_embeddings": False,
    }
    for key, value in wanted.items():
        if key in hf and hf[key] != value:
            problems.append(f"{key}={hf[key]!r}: megatron's hybrid model needs {value!r}")
    if hf.get("num_nextn_predict_layers", 0):
        problems.append(f"num_nextn_predict_layers={hf['num_nextn_predict_layers']}: MTP layers are not supported")
    return problems


def _moe_import_problems(hf: dict[str, Any]) -> list[str]:
    """What of NemotronH's moe layer megatron's MoE cannot compute."""
    problems = [f"config.json lacks {key}: not a complete NemotronH MoE config"
                for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                            "moe_shared_expert_intermediate_size") if hf.get(key) is None]
    if int(hf.get("n_group") or 1) != 1:
        problems.append(f"n_group={hf['n_group']}: group-limited routing is not imported (megatron picks groups by "
                        "another rule)")
    if hf.get("norm_topk_prob") is False:
        problems.append("norm_topk_prob=false: megatron always normalises the top-k weights")
    if int(hf.get("num_experts_per_tok") or 2) == 1:
        problems.append("num_experts_per_tok=1: megatron keeps the raw score at k=1 where NemotronH normalises it")
    if hf.get("moe_latent_size"):
        problems.append(f"moe_latent_size={hf['moe_latent_size']}: latent MoE projections are not imported")
    return problems


def check_importable(hf: dict[str, Any]) -> None:
    problems = import_problems(hf)
    if problems:
        raise ConfigError("cannot import this NemotronH model: " + "; ".join(problems))
    pattern = hf_pattern(hf)
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    if pat.MAMBA in pattern and eps != MEGATRON_GATED_NORM_EPS:
        log.warning(
            "layer_norm_epsilon=%s: the HF model uses it in the Mamba gated norm too, megatron uses %s there: "
            "outputs will differ slightly",
            eps,
            MEGATRON_GATED_NORM_EPS,
        )
    dt_min = float(hf.get("time_step_min", 1e-3))
    if pat.MAMBA in pattern and dt_min > 1e-30:
        log.warning(
            "time_step_min=%s: HF clamps dt at this floor, megatron does not clamp: outputs differ wherever "
            "softplus(dt) falls below it",
            dt_min,
        )
