"""RunConfig -> megatron-core TransformerConfig -> HybridModel chunks for this pipeline rank.

Needs CUDA, mamba-ssm and causal-conv1d (megatron's MambaMixer allocates on the current CUDA device
and imports the kernels at construction). ``padded_vocab_size`` and ``transformer_config_kwargs``
are pure and run anywhere.
"""

from __future__ import annotations

import logging
import os

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import ModelConfig, RunConfig
from hybrid_megatron.model import pattern as pat

log = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, model: ModelConfig, tp_size: int) -> int:
    """Pads to a multiple of ``make_vocab_size_divisible_by`` (not times TP, unlike megatron).

    Keeping the padded size independent of TP lets a checkpoint reload at another TP size; TP must
    then divide the padded size, which the default 128 guarantees for TP up to 128.
    """
    multiple = model.make_vocab_size_divisible_by
    padded = -(-vocab_size // multiple) * multiple
    if padded % tp_size:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp_size} does not divide the padded vocabulary {padded} "
            f"(model.make_vocab_size_divisible_by={multiple})"
        )
    return padded


def _activation(model: ModelConfig) -> dict:
    import torch.nn.functional as F
    from megatron.core.activations import squared_relu

    if model.activation == "squared_relu":
        return {"activation_func": squared_relu, "gated_linear_unit": False}
    if model.activation == "swiglu":
        return {"activation_func": F.silu, "gated_linear_unit": True}
    return {"activation_func": F.gelu, "gated_linear_unit": False}


def _interleaved_p2p() -> dict:
    """P2P settings of the interleaved schedule: overlapped, unbatched sends and receives (Megatron-LM's
    default for it). megatron-core's own default batches them, and at PP=2, where a rank's previous and
    next stage are the same rank, one batch then holds two sends and two receives between the same pair:
    Megatron-LM refuses interleaving without overlap below PP=3 for that reason. Measured at PP=2 with 16
    micro-batches a step: grad norm 33 against TP=1's 18 at step 1 and 8e9 by step 30, loss stuck near 5;
    with 2 micro-batches a step (= PP) the same run trained as TP=1 does. With these settings the 16
    micro-batch run follows TP=1 within 0.55% over 60 steps (parallel_parity_h200x2.json)."""
    return {"overlap_p2p_comm": True, "batch_p2p_comm": False}


def window_kwargs(m: ModelConfig) -> dict:
    """megatron's sliding-window fields: ``window_size`` (TE's (left, right): the window less the token
    itself, nothing to the right) and ``window_attn_skip_freq`` as one flag per layer of the whole pattern
    (megatron numbers every hybrid layer, Mamba and MLP included): 1 for a windowed attention layer."""
    if m.attention_window is None:
        return {}
    windowed = iter(m.windowed_attention())
    flags = [int(next(windowed)) if s == pat.ATTENTION else 0 for s in pat.layers(m.hybrid_layer_pattern)]
    return {"window_size": (m.attention_window - 1, 0), "window_attn_skip_freq": flags}


def gdn_kwargs(m: ModelConfig) -> dict:
    """megatron's Gated DeltaNet fields (``linear_*``), when the pattern has ``G`` layers."""
    if pat.GDN not in m.hybrid_layer_pattern:
        return {}
    return {"linear_conv_kernel_dim": m.gdn_conv_kernel, "linear_key_head_dim": m.gdn_key_head_dim,
            "linear_value_head_dim": m.gdn_value_head_dim, "linear_num_key_heads": m.num_gdn_key_heads,
            "linear_num_value_heads": m.num_gdn_value_heads}


def moe_kwargs(cfg: RunConfig) -> dict:
    """megatron's MoE fields, when the pattern has ``E`` layers: top-k routing computed in fp32, grouped GEMM,
    the all-to-all token dispatcher, dropless unless a capacity factor is set."""
    m = cfg.model
    if pat.MOE not in m.hybrid_layer_pattern:
        return {}
    return {
        "num_moe_experts": m.moe_num_experts, "moe_router_topk": m.moe_top_k,
        "moe_ffn_hidden_size": m.expert_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": m.moe_shared_expert_size,
        "moe_router_score_function": m.moe_router_score_function, "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        "moe_aux_loss_coeff": m.moe_aux_loss_coeff, "moe_router_enable_expert_bias": m.moe_expert_bias,
        "moe_expert_capacity_factor": m.moe_capacity_factor,
        "moe_router_topk_scaling_factor": m.moe_routed_scaling_factor,
        "moe_grouped_gemm": True, "moe_token_dispatcher_type": "alltoall",
        "expert_model_parallel_size": cfg.parallel.expert_model_parallel_size,
    }


def check_gdn_kernels(m: ModelConfig) -> None:
    """ConfigError when the pattern has ``G`` layers and megatron cannot import flash-linear-attention's kernels
    (missing, or a release whose modules moved: megatron-core 0.19 imports 0.4's layout)."""
    if pat.GDN not in m.hybrid_layer_pattern:
        return
    from megatron.core.ssm.gated_delta_net.common import HAVE_FLA

    if not HAVE_FLA:
        raise ConfigError("model.hybrid_layer_pattern has Gated DeltaNet layers ('G'): megatron-core cannot import "
                          "their kernels (fla.modules.convolution, fla.modules.l2norm, fla.ops.gated_delta_rule): "
                          "pip install 'flash-linear-attention~=0.4.0'")


def transformer_config_kwargs(cfg: RunConfig) -> dict:
    """Everything megatron's TransformerConfig needs from our config (torch imported, no CUDA)."""
    import torch

    m, par, prec, train = cfg.model, cfg.parallel, cfg.precision, cfg.train
    bf16 = prec.dtype == "bf16"
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.head_dim,
        mamba_state_dim=m.mamba_state_dim,
        mamba_head_dim=m.mamba_head_dim,
        mamba_num_groups=m.mamba_num_groups,
        mamba_num_heads=m.num_mamba_heads,
        is_hybrid_model=True,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_bias_linear,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=pat.virtual_pipeline_size(
            m.hybrid_layer_pattern, par.pipeline_model_parallel_size
        ),
        sequence_parallel=par.sequence_parallel,
        context_parallel_size=par.context_parallel_size,
        calculate_per_token_loss=True,
        deterministic_mode=train.deterministic,
        **_activation(m),
    )
    kwargs.update(attention_backend=attention_backend(cfg), **window_kwargs(m), **gdn_kwargs(m), **moe_kwargs(cfg))
    if kwargs["virtual_pipeline_model_parallel_size"] is not None:
        kwargs.update(_interleaved_p2p())
    if train.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif train.recompute == "full":
        kwargs.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=train.recompute_num_layers
        )
    if prec.fp8:
        bf16_layers = prec.fp8_bf16_layers_at_start or prec.fp8_bf16_layers_at_end
        kwargs.update(
            fp8=prec.fp8,
            fp8_recipe=prec.fp8_recipe,
            fp8_amax_history_len=prec.fp8_amax_history_len,
            fp8_amax_compute_algo="max",
            first_last_layers_bf16=bool(bf16_layers),
            num_layers_at_start_in_bf16=prec.fp8_bf16_layers_at_start,
            num_layers_at_end_in_bf16=prec.fp8_bf16_layers_at_end,
        )
    return kwargs


# megatron's LanguageModule sets TE's switches (NVTE_FLASH_ATTN, NVTE_FUSED_ATTN, NVTE_UNFUSED_ATTN) from
# config.attention_backend and asserts deep in the model build when the environment already holds another value
ATTENTION_SWITCHES = {"auto": (1, 1, 1), "flash": (1, 0, 0), "fused": (0, 1, 0), "unfused": (0, 0, 1)}


def attention_backend(cfg: RunConfig):
    """megatron's AttnBackend for this run: model.attention_backend, except that ``auto`` in a deterministic
    run with packed documents becomes :func:`deterministic_attention_backend`'s choice."""
    from megatron.core.transformer.enums import AttnBackend

    name = cfg.model.attention_backend
    packed_deterministic = cfg.train.deterministic and cfg.data.reset_at_document_boundaries
    if name == "auto" and packed_deterministic:
        return deterministic_attention_backend()
    if name == "fused" and packed_deterministic:
        log.warning("model.attention_backend=fused with train.deterministic and packed documents: cuDNN's "
                    "deterministic thd backward needs ~128*B*H*S^2 bytes of workspace (B: documents per micro-batch)")
    return AttnBackend[name]


def check_attention_env(backend) -> None:
    """ConfigError naming an NVTE_*_ATTN variable of the environment that megatron would refuse."""
    for var, want in zip(("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"), ATTENTION_SWITCHES[backend.name]):
        have = os.environ.get(var)
        if have is not None and have != str(want):
            raise ConfigError(
                f"{var}={have} in the environment conflicts with attention backend {backend.name} (megatron-core "
                f"sets it to {want}): unset it and choose model.attention_backend=auto|flash|fused|unfused instead"
            )


def deterministic_attention_backend():
    """Attention for ``train.deterministic`` with packed documents (TE's ``thd`` layout).

    cuDNN's deterministic thd backward (TE FusedAttention) asks for about 128 * B * H * S^2 bytes of
    workspace, B being the documents in a micro-batch: configs/tiny.yaml's deterministic runs (8 x 1024
    tokens of source files per micro-batch, 8 heads) asked for 64 GiB on an H100, and TE itself only
    avoids it above B * H * S^2 = 2^30. So FusedAttention is not used there: FlashAttention-2 (its
    deterministic backward) where flash-attn is installed (the NGC image), else TE's unfused attention.
    Both cost more than cuDNN; deterministic runs are for verification. Megatron sets TE's NVTE_*_ATTN
    switches from this choice.
    """
    import importlib.util

    from megatron.core.transformer.enums import AttnBackend

    backend = AttnBackend.flash if importlib.util.find_spec("flash_attn") is not None else AttnBackend.unfused
    log.info("train.deterministic with packed documents: %s attention (cuDNN's deterministic thd backward "
             "needs ~128*B*H*S^2 bytes of workspace)", backend.name)
    return backend


def build_transformer_config(cfg: RunConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        return TransformerConfig(**transformer_config_kwargs(cfg))
    except (AssertionError, ValueError) as exc:  # megatron validates combinations we do not pre-check
        raise ConfigError(f"megatron-core rejects this model/parallel config: {exc}") from None


def build_model_chunks(cfg: RunConfig, vocab_size: int, max_seq_len: int) -> list:
    """Builds this rank's HybridModel chunk(s) on the current CUDA device (bf16 or fp32, not yet wrapped)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from hybrid_megatron.model.specs import resolve_layer_spec, stack_spec

    spec_name = resolve_layer_spec(cfg.model)
    if spec_name == "local" and cfg.parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel=true needs model.layer_spec=te (torch norms do not shard)")
    if spec_name == "local" and cfg.model.attention_window is not None:
        raise ConfigError("model.attention_window needs Transformer Engine's attention (model.layer_spec: te); the "
                          "local spec's attention is full")
    if spec_name == "local" and cfg.precision.fp8:
        raise ConfigError("precision.fp8 needs Transformer Engine: model.layer_spec=local cannot run FP8")
    check_gdn_kernels(cfg.model)
    config = build_transformer_config(cfg)
    check_attention_env(config.attention_backend)
    if cfg.train.deterministic:
        from hybrid_megatron.model import deterministic_conv

        deterministic_conv.install()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = config.virtual_pipeline_model_parallel_size
    # With pp == 1 megatron would read '|' cuts as virtual stages: hand it the uncut pattern.
    layer_pattern = cfg.model.hybrid_layer_pattern if pp > 1 else pat.layers(cfg.model.hybrid_layer_pattern)
    spec = stack_spec(cfg)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = HybridModel(
            config=config,
            hybrid_stack_spec=spec,
            vocab_size=padded_vocab_size(vocab_size, cfg.model, tp),
            max_sequence_length=max_seq_len,
            hybrid_layer_pattern=layer_pattern,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type=cfg.model.position_embedding_type,
            rotary_base=cfg.model.rotary_base,
            vp_stage=stage,
        )
        # megatron's layers allocate on the current CUDA device, torch norms (the local spec) on the default
        # one: move what is left behind, as megatron's own get_model does
        if not config.use_cpu_initialization:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    log.info("built %d model chunk(s) with the %s layer spec", len(chunks), spec_name)
    return chunks
