"""Keep SSM parameters (Mamba's A_log, D, dt_bias; Gated DeltaNet's A_log, dt_bias) in fp32 while the rest of
the model runs in bf16.

megatron-core's ``Float16Module`` calls ``module.bfloat16()``, which casts every parameter, the
Mamba decay/skip/step parameters included: the rounding of A_log and dt_bias to 8 mantissa bits
is the instability the Mamba authors warn about. We take fp32 copies before the wrap and put them
back after it, before DDP and the optimizer see the parameters: DDP keeps fp32 params in their own
grad buffer and the distributed optimizer in its own group, so gradients, optimizer state and
checkpoints stay fp32 for them. The mixers already compute with them in fp32 (Mamba calls ``.float()``,
GatedDeltaNet forms its decay ``-exp(A_log) * softplus(alpha + dt_bias)`` in fp32).
"""

from __future__ import annotations

import torch

from hybrid_megatron.model.geometry import fp32_param_suffixes

_SUFFIXES = fp32_param_suffixes()


def is_ssm_fp32_param(name: str) -> bool:
    """True for the parameters the geometry marks fp32 (by their last two name parts, e.g. ``mixer.A_log``)."""
    return ".".join(name.split(".")[-2:]) in _SUFFIXES


def ssm_fp32_params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if is_ssm_fp32_param(name)}


def wrap_half_keep_ssm_fp32(config, module: torch.nn.Module) -> torch.nn.Module:
    """``Float16Module(config, module)`` with the SSM parameters restored to fp32 values and dtype."""
    from megatron.core.transformer.module import Float16Module

    saved = {name: p.detach().float().clone() for name, p in ssm_fp32_params(module).items()}
    wrapped = Float16Module(config, module)
    inner = wrapped.module
    for name, param in ssm_fp32_params(inner).items():
        param.data = saved[name].to(param.device)  # same Parameter object, fp32 storage, exact values
    return wrapped
