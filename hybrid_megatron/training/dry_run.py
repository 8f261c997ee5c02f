"""`pretrain --dry-run`: what a run would build, computed on any machine (no GPU, no megatron model)."""

from __future__ import annotations

import logging

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import RunConfig
from hybrid_megatron.config_io import dump_yaml
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.build import padded_vocab_size
from hybrid_megatron.model.flops import (
    active_parameters,
    forward_flops_per_token,
    num_parameters,
    stage_parameters,
    training_flops_per_token,
)
from hybrid_megatron.model.inference_cache import cache_lines
from hybrid_megatron.model.memory import data_parallel_size, estimate, estimate_lines
from hybrid_megatron.training.lr import run_plan
from hybrid_megatron.training.step import micro_batch_plan

log = logging.getLogger(__name__)


def vocab(cfg: RunConfig) -> tuple[int, list[str]]:
    """(vocab size, notes): the model's, else the data's; missing data sources are a note when the model pins the
    vocab, or when pretrain would build the sample data (bytes tokenizer) first. The ladder sizes its runs by it too."""
    missing = [f"{name}: {loc}" for name, loc in cfg.data.source_paths().items() if not loc.is_dir()]
    notes = []
    if missing and cfg.build_sample_data:
        from data_pipeline.tokenizer import ByteTokenizer

        notes.append(f"data: {len(missing)} source(s) missing; pretrain builds the sample data (bytes tokenizer) first")
        return cfg.model.vocab_size or ByteTokenizer.vocab_size, notes
    elif missing:
        notes.append("data: missing source directories (pretrain stops on these): " + "; ".join(missing))
    if missing and cfg.model.vocab_size:
        return cfg.model.vocab_size, notes
    if missing:
        raise ConfigError(
            f"data source {missing[0]} does not exist and model.vocab_size is not set (it comes from the data)"
        )
    from data_pipeline.loader import config_vocab_size

    data_vocab = config_vocab_size(cfg.data)
    if cfg.model.vocab_size and cfg.model.vocab_size < data_vocab:  # the same refusal as training's set-up
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary ({data_vocab})")
    return cfg.model.vocab_size or data_vocab, notes


def _check_load(cfg: RunConfig) -> None:
    """checkpoint.load must name a checkpoint, unless this run's save dir already has one (it wins then)."""
    from hybrid_megatron.checkpoint import layout

    if cfg.checkpoint.load and layout.read_latest(cfg.save_dir) is None:
        layout.resolve_step_dir(cfg.checkpoint.load, what="checkpoint.load=")


def _shapes(cfg: RunConfig):
    """(vocab, notes, padded vocab, data schedule, longest sequence): what the report and the estimate size by."""
    from data_pipeline.schedule import build_schedule

    vocab_size, notes = vocab(cfg)
    padded = padded_vocab_size(vocab_size, cfg.model, cfg.parallel.tensor_model_parallel_size)
    schedule = build_schedule(cfg.data)
    return vocab_size, notes, padded, schedule, schedule.max_seq_len


def peak_memory_bytes(cfg: RunConfig, *, world_size: int) -> float:
    """The memory estimate of the run's fullest GPU (its worst pipeline stage at its longest sequence)."""
    _, _, padded, _, max_seq = _shapes(cfg)
    return max(stage.total for stage in estimate(cfg, padded, max_seq, world_size=world_size))


def describe(cfg: RunConfig, *, world_size: int = 8) -> str:
    """The dry-run report; ``world_size`` GPUs set the data-parallel size of the memory estimate."""
    m, par = cfg.model, cfg.parallel
    dp = data_parallel_size(cfg, world_size)
    cfg.data.check_dp_size(dp)  # the loader refuses the same at startup
    _check_load(cfg)
    vocab, notes, padded, schedule, max_seq = _shapes(cfg)
    steps, segments = run_plan(cfg, schedule)
    stages = pat.split_stages(m.hybrid_layer_pattern, par.pipeline_model_parallel_size)
    per_stage = stage_parameters(m, padded, par.pipeline_model_parallel_size)
    total = num_parameters(m, padded)
    counts = pat.count_layers(m.hybrid_layer_pattern)
    lines = ["# resolved config", dump_yaml(cfg).rstrip(), "", "# layout"]
    lines.append(
        f"layers: {m.num_layers} ({', '.join(f'{n} {k}' for k, n in counts.items() if n)}); "
        f"vocab {vocab} padded to {padded}"
    )
    lines.append(
        f"data-parallel size: {dp} ({world_size} GPUs / (TP {par.tensor_model_parallel_size} x "
        f"PP {par.pipeline_model_parallel_size}))"
    )
    for stage, n in zip(stages, per_stage):
        chunks = " ".join(
            f"[{first}:{first + len(chunk)}] {chunk}" for chunk, first in zip(stage.chunks, stage.first_layer)
        )
        lines.append(f"pp stage {stage.pp_rank}: {chunks}  ({n:,} params, {n / par.tensor_model_parallel_size:,.0f} per TP rank)")
    lines += [
        "",
        "# size and cost",
        f"parameters: {total:,} ({total / 1e9:.3f}B)" + (
            f"; active per token {active_parameters(m, padded):,} ({active_parameters(m, padded) / 1e9:.3f}B: "
            f"top-{m.moe_top_k} of {m.moe_num_experts} experts; FLOPs below count these)" if counts["moe"] else ""),
        f"FLOPs per token at seq {max_seq}: forward {forward_flops_per_token(m, padded, max_seq):,}, "
        f"training {training_flops_per_token(m, padded, max_seq):,}",
        f"run: {schedule.total_steps} steps, {schedule.total_tokens:,} tokens "
        f"({cfg.data.global_batch_tokens:,} per step), phases {', '.join(p.name for p in cfg.data.phases)}"
        + (f"; train.train_steps stops it at step {steps}" if steps < schedule.total_steps else ""),
        "lr: " + "; ".join(f"steps {g.start + 1}-{g.start + g.steps} {g.style}, warmup {g.warmup} to {g.max_lr:.3g}"
                           for g in segments),
        "micro-batches per DP rank: " + ", ".join(
            f"seq {seq} -> {n} x {mbs}" for seq, (mbs, n) in micro_batch_plan(cfg, schedule, dp).items()),
    ]
    lines += ["", "# memory per GPU (estimate)"] + estimate_lines(cfg, padded, max_seq, world_size=world_size)
    lines += ["", "# inference cache per sequence"] + cache_lines(cfg.model)
    if notes:
        lines += ["", "# notes"] + notes
    return "\n".join(lines)
