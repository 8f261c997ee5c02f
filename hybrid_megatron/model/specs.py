"""ModuleSpec trees for the hybrid stack: Transformer Engine layers, and a non-TE fallback.

Both specs produce the same checkpoint keys (the TE names, where each pre-norm is fused into the
following linear as ``layer_norm_weight``), so a checkpoint moves between them and the converter
reads one layout. Mamba mixer hyper-parameters that megatron takes as constructor arguments rather
than config fields (conv kernel, chunk size, expand) travel as spec params.
"""

from __future__ import annotations

from functools import partial

from hybrid_megatron.config import ModelConfig, RunConfig


def _mixer_params(model: ModelConfig) -> dict:
    return {"d_conv": model.mamba_conv_kernel, "chunk_size": model.mamba_chunk_size, "expand": model.mamba_expand}


def _mixer_class(state_passing: bool):
    """megatron's MambaMixer, or the one with state-passing context parallelism (model/mamba_cp_mixer.py)."""
    if state_passing:
        from hybrid_megatron.model.mamba_cp_mixer import StatePassingMambaMixer

        return StatePassingMambaMixer
    from megatron.core.ssm.mamba_mixer import MambaMixer

    return MambaMixer


def te_available() -> bool:
    import importlib

    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # TE raises assorted errors when its CUDA libraries are missing
        return False
    return True


def resolve_layer_spec(model: ModelConfig) -> str:
    """'te' or 'local' for model.layer_spec ('auto' picks te when Transformer Engine imports)."""
    if model.layer_spec == "auto":
        return "te" if te_available() else "local"
    return model.layer_spec


def _gdn_layer(input_layernorm, in_proj, out_norm, out_proj, keys_map: dict | None = None):
    """The ``G`` layer: a TransformerLayer whose token mixer is megatron's GatedDeltaNet (no MLP inside)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from hybrid_megatron.model.gdn import SiluGatedDeltaNet

    norm = {"input_layernorm": input_layernorm} if input_layernorm is not None else {}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            **norm,
            self_attention=ModuleSpec(
                module=SiluGatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(in_proj=in_proj, out_norm=out_norm, out_proj=out_proj),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map or {},
        ),
    )


def _moe_layer(model: ModelConfig, norm):
    """The ``E`` layer: megatron's MoE (router, grouped-GEMM experts, optional shared expert) after a pre-norm."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayerSubmodules

    experts = model.moe_num_experts or 1  # only checked for being set: the count comes from the config
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=get_moe_module_spec(use_te=True, num_experts=experts, moe_grouped_gemm=True),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_stack_spec(model: ModelConfig, bf16_mamba_projections: bool = False, state_passing: bool = False):
    """The hybrid stack on Transformer Engine: fused norm+linear, cuDNN/flash attention, FP8-capable.

    ``bf16_mamba_projections``: Mamba in_proj/out_proj run in BF16 even inside FP8 layers (``fp8_scope``).
    """
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    mamba_in_proj, mamba_out_proj = TELayerNormColumnParallelLinear, TERowParallelLinear
    if bf16_mamba_projections:
        from hybrid_megatron.model.fp8_scope import bf16_mamba_projections as bf16_classes

        mamba_in_proj, mamba_out_proj = bf16_classes()
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    mixer=ModuleSpec(
                        module=_mixer_class(state_passing),
                        params=_mixer_params(model),
                        submodules=MambaMixerSubmodules(in_proj=mamba_in_proj, out_proj=mamba_out_proj),
                    ),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            gdn_layer=_gdn_layer(None, TELayerNormColumnParallelLinear, TENorm, TERowParallelLinear),
            moe_layer=_moe_layer(model, TENorm),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=TELayerNormColumnParallelLinear,
                            core_attention=TEDotProductAttention,
                            linear_proj=TERowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    mlp=partial(
                        MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(
                            linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
                        ),
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
        ),
    )


def local_stack_spec(model: ModelConfig, state_passing: bool = False):
    """The hybrid stack without Transformer Engine: megatron's parallel linears, torch norms and SDPA.

    Checkpoint keys are mapped onto the TE names, so both specs read each other's checkpoints.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from hybrid_megatron.model.attention import SDPAttention
    from hybrid_megatron.model.local_stack import LocalHybridStack

    return ModuleSpec(
        module=LocalHybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=WrappedTorchNorm,
                    mixer=ModuleSpec(
                        module=_mixer_class(state_passing),
                        params=_mixer_params(model),
                        submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
                    ),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
                ),
            ),
            gdn_layer=_gdn_layer(WrappedTorchNorm, ColumnParallelLinear, WrappedTorchNorm, RowParallelLinear,
                                 {"input_layernorm.": "self_attention.in_proj.layer_norm_"}),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=WrappedTorchNorm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ColumnParallelLinear,
                            core_attention=SDPAttention,
                            linear_proj=RowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=WrappedTorchNorm,
                    mlp=partial(
                        MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                    ),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
                ),
            ),
        ),
    )


def stack_spec(cfg: RunConfig):
    par = cfg.parallel
    state_passing = par.context_parallel_size > 1 and par.mamba_context_parallel == "state_passing"
    if resolve_layer_spec(cfg.model) == "local":
        return local_stack_spec(cfg.model, state_passing)
    p = cfg.precision
    return te_stack_spec(cfg.model, bf16_mamba_projections=bool(p.fp8 and p.fp8_mamba_projections_bf16),
                         state_passing=state_passing)
