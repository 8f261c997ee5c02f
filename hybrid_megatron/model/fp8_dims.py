"""Shapes FP8 can run: Transformer Engine's FP8 GEMMs need every operand dimension to be a multiple of 16.

TE checks ``prod(leading dims) % 8`` and ``last dim % 16`` on each operand of a forward GEMM; the weight
gradient GEMM puts the token dimension last, so token counts need 16 as well (TE's documentation:
"both dimensions divisible by 16 ... padding sequence length to be multiple of 16"). Checked here on
the config, so a bad shape is one line before any GPU work instead of a ValueError deep inside TE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_megatron.model import geometry as geo
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig

if TYPE_CHECKING:
    from data_pipeline.config import DataConfig

MULTIPLE = 16


def gemm_dims(m: ModelConfig, tp: int) -> list[tuple[str, int]]:
    """(what, size per TP rank) of every TP-split weight dimension of the FP8 GEMMs of the pattern's layers."""
    dims = [("model.hidden_size", m.hidden_size)]
    for symbol in sorted(set(pat.layers(m.hybrid_layer_pattern)), key=pat.SUPPORTED_SYMBOLS.index):
        dims += [(f"{what} {size} / TP {tp}", size // tp) for what, size in geo.layer(m, symbol).sharded_gemm_dims]
    return dims


def seq_len_settings(data: DataConfig) -> list[tuple[str, int]]:
    """The settings that decide every sequence length a run trains at."""
    c = data.curriculum
    if c is None:
        return [("data.seq_len", data.seq_len)]
    if c.schedule == "fixed_discrete":
        return [(f"data.curriculum.seq_lens[{i}]", v) for i, v in enumerate(c.seq_lens)]
    return [("data.curriculum.min_seq_len", c.min_seq_len), ("data.curriculum.max_seq_len", c.max_seq_len),
            ("data.curriculum.step", c.step)]


def first_problem(m: ModelConfig, tp: int, data: DataConfig) -> str | None:
    """The first shape FP8 cannot run, as a one-line message; None when every shape works."""
    for what, size in gemm_dims(m, tp):
        if size % MULTIPLE:
            return f"precision.fp8 needs {what} to be a multiple of {MULTIPLE} (Transformer Engine's FP8 GEMMs), got {size}"
    for name, value in seq_len_settings(data):
        if value % MULTIPLE:
            return (f"precision.fp8 needs sequence lengths that are multiples of {MULTIPLE} (Transformer Engine's "
                    f"FP8 GEMMs): {name}={value}")
    return None
