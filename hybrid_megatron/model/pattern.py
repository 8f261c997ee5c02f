"""The hybrid layer pattern: validation and the split into pipeline stages, in pure Python.

Symbols follow megatron-core's ``hybrid_layer_allocation.Symbols``: ``M`` Mamba-2, ``G`` Gated DeltaNet,
``*`` attention (no MLP), ``-`` dense MLP, ``E`` MoE, ``|`` a pipeline-segment cut. megatron-core parses the same
string when it builds the model; doing it here first lets ``--dry-run`` and config validation run on
a CPU and fail with one line instead of an assertion inside the model constructor.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.errors import ConfigError

MAMBA, GDN, ATTENTION, MLP, MOE, PIPE = "M", "G", "*", "-", "E", "|"
LAYER_SYMBOLS = {MAMBA: "mamba", GDN: "gdn", ATTENTION: "attention", MLP: "mlp", MOE: "moe"}
SUPPORTED_SYMBOLS = tuple(LAYER_SYMBOLS)  # megatron's D (sparse attention), + (MLA) and / (MTP) are not built here


@dataclass(frozen=True, slots=True)
class StageLayout:
    """The layers of one pipeline stage (one model chunk per virtual stage)."""

    pp_rank: int
    chunks: tuple[str, ...]  # pattern segment of each virtual stage, in order
    first_layer: tuple[int, ...]  # global index (0-based) of each chunk's first layer


def validate_pattern(pattern: str) -> None:
    """Raises ConfigError naming the first bad symbol and its position (0-based)."""
    if not pattern:
        raise ConfigError("model.hybrid_layer_pattern is empty")
    for pos, char in enumerate(pattern):
        if char == PIPE:
            continue
        if char not in LAYER_SYMBOLS:
            raise ConfigError(
                f"model.hybrid_layer_pattern: unknown symbol {char!r} at position {pos} in {pattern!r} "
                f"(known: M mamba, G gated deltanet, * attention, - mlp, E moe, | pipeline cut)"
            )
    segments = pattern.split(PIPE)
    for i, segment in enumerate(segments):
        if not segment:
            raise ConfigError(f"model.hybrid_layer_pattern: pipeline segment {i} of {pattern!r} is empty")


def layers(pattern: str) -> str:
    """The pattern without pipeline cuts: one symbol per layer."""
    return pattern.replace(PIPE, "")


def count_layers(pattern: str) -> dict[str, int]:
    flat = layers(pattern)
    return {name: flat.count(sym) for sym, name in LAYER_SYMBOLS.items()}


def split_stages(pattern: str, pp_size: int) -> list[StageLayout]:
    """Assigns pattern segments to pipeline ranks the way megatron-core does.

    With ``pp_size == 1`` the whole pattern is one stage, cuts ignored. Otherwise the number of
    segments must be a multiple of ``pp_size``; segment ``s`` goes to rank ``s % pp_size`` as virtual
    stage ``s // pp_size`` (interleaved schedule when there is more than one per rank).
    """
    validate_pattern(pattern)
    if pp_size < 1:
        raise ConfigError(f"parallel.pipeline_model_parallel_size={pp_size}: must be >= 1")
    if pp_size == 1:  # cuts only matter to pipelines: one stage holds every layer
        return [StageLayout(pp_rank=0, chunks=(layers(pattern),), first_layer=(0,))]
    segments = pattern.split(PIPE)
    if len(segments) == 1:
        raise ConfigError(
            f"model.hybrid_layer_pattern has no '|' cuts but parallel.pipeline_model_parallel_size={pp_size}: "
            f"cut it into a multiple of {pp_size} segments, e.g. {_suggest_cut(pattern, pp_size)!r}"
        )
    if len(segments) % pp_size != 0:
        raise ConfigError(
            f"model.hybrid_layer_pattern splits into {len(segments)} segments at its '|' cuts "
            f"({' | '.join(segments)}), which parallel.pipeline_model_parallel_size={pp_size} does not divide"
        )
    starts, offset = [], 0
    for segment in segments:
        starts.append(offset)
        offset += len(segment)
    stages = []
    for rank in range(pp_size):
        idx = list(range(rank, len(segments), pp_size))
        stages.append(
            StageLayout(pp_rank=rank, chunks=tuple(segments[i] for i in idx), first_layer=tuple(starts[i] for i in idx))
        )
    return stages


def _suggest_cut(pattern: str, pp_size: int) -> str:
    flat = layers(pattern)
    step = max(1, -(-len(flat) // pp_size))
    return PIPE.join(flat[i : i + step] for i in range(0, len(flat), step))


def virtual_pipeline_size(pattern: str, pp_size: int) -> int | None:
    """Model chunks per pipeline rank, or None when there is one (no interleaving)."""
    n = len(pattern.split(PIPE)) // pp_size if pp_size > 1 else 1
    return n if n > 1 else None
