"""Transformer Engine linears that stay in BF16 inside an FP8 layer (``precision.fp8_mamba_projections_bf16``).

megatron-core chooses FP8 per layer (``get_fp8_context`` around each layer of the stack); inside an
FP8 Mamba layer its ``in_proj`` (the fused RMSNorm + projection to x, z, B, C, dt) and ``out_proj``
are FP8 GEMMs. These subclasses run their forward under ``autocast(enabled=False)``, so those two
GEMMs (forward, and backward, which follows the forward's choice) run in BF16 while attention and MLP
layers keep FP8. TE restores the enclosing FP8 state on exit. Parameters, checkpoint keys and
sharding are the base classes' own: a checkpoint moves freely between the two settings.
"""

from __future__ import annotations

from functools import cache


def bf16_forward(base: type, disabled_fp8) -> type:
    class BF16Linear(base):
        def forward(self, *args, **kwargs):
            with disabled_fp8():
                return super().forward(*args, **kwargs)

    BF16Linear.__name__ = BF16Linear.__qualname__ = f"BF16{base.__name__}"
    BF16Linear.__module__ = __name__
    return BF16Linear


@cache
def bf16_mamba_projections() -> tuple[type, type]:
    """(column-parallel in_proj class, row-parallel out_proj class) that never run FP8 GEMMs."""
    import transformer_engine.pytorch as te
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TERowParallelLinear

    autocast = getattr(te, "autocast", None) or te.fp8_autocast  # TE >= 2.8 renamed fp8_autocast

    def disabled_fp8():
        return autocast(enabled=False)

    return bf16_forward(TELayerNormColumnParallelLinear, disabled_fp8), bf16_forward(TERowParallelLinear, disabled_fp8)
