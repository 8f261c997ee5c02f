"""megatron's optimizer (Adam, distributed or not) over our parameter groups.

The groups: megatron's standard ones (no weight decay on biases and 1-D params) plus one holding only
the fp32 SSM parameters (``model/fp32_params.py``), which the distributed optimizer must not mix with
bf16 parameters.
"""

from __future__ import annotations

from hybrid_megatron.config import RunConfig


def build_optimizer(cfg: RunConfig, model_chunks: list):
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.precision.dtype == "bf16",
        params_dtype=torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,  # megatron: same value as the DDP config's
    )
    return get_megatron_optimizer(opt_config, model_chunks, config_overrides=param_group_overrides(opt_config))


def param_group_overrides(opt_config) -> dict:
    """megatron's standard groups (no weight decay on biases and 1-D params) plus one group holding
    only the fp32 SSM params (A_log, D, dt_bias; no weight decay, as in mamba-ssm).

    A group must not mix fp32 and bf16 params: megatron-core 0.19.2 maps optimizer state to model
    params per dtype within a group, and a mixed group makes checkpoint saving pair state with the
    wrong param (shape errors in both optimizers' sharded_state_dict).
    """
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    from hybrid_megatron.model.fp32_params import is_ssm_fp32_param

    overrides = get_standard_config_overrides(opt_config)
    ssm = ParamWithNamePredicate(name="ssm_fp32_params", fn=lambda param, name: is_ssm_fp32_param(name))
    overrides[ParamKey(with_name_predicate=ssm)] = ParamGroupOverride(start_wd=0.0, end_wd=0.0)
    return overrides
