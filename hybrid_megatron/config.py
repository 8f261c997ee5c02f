"""Run configuration: one dataclass per concern, loaded from YAML with dotlist overrides.

A run is a YAML file (``configs/tiny.yaml``) whose top-level sections are the fields of
``RunConfig``; ``load_run_config(path, overrides)`` applies ``section.key=value`` overrides, builds the
tree and validates it. Each section checks its own fields in ``__post_init__``; checks that need two
sections (TP against head counts, FP8 against layer sizes) live in ``RunConfig.__post_init__``. Every
failure is a ``ConfigError`` whose message names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError
from hybrid_megatron.config_io import apply_overrides, build, load_yaml
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig, positive


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    """Shard norms/dropout activations over the sequence across TP ranks (needs TP > 1)."""
    expert_model_parallel_size: int = 1
    """MoE layers: experts split over this many ranks of the data-parallel group (EP divides DP and the experts)."""
    context_parallel_size: int = 1
    """Context parallelism: each sequence split over this many ranks (attention: TE's ring of K/V chunks; Mamba:
    megatron's all-to-all over heads, so CP divides the Mamba heads per TP rank). Planned by the dry run (memory,
    layout, the caps); training with CP > 1 is refused until its step has run on several GPUs."""
    mamba_context_parallel: Literal["all_to_all", "state_passing"] = "all_to_all"
    """Mamba layers under CP > 1: megatron's all-to-all over heads (capped at the heads per TP rank), or state
    passing (model/ssm_state_passing.py: every rank keeps all heads, its share of the sequence and passes the SSM
    state on; no head cap)."""
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    def __post_init__(self) -> None:
        positive(
            "parallel",
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            context_parallel_size=self.context_parallel_size,
        )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")


@dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Parameter and activation dtype (FP8 GEMMs come on top of bf16)."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """FP8 format through Transformer Engine; None for no FP8."""
    fp8_recipe: Literal["tensorwise", "delayed"] = "tensorwise"
    """Per-tensor scaling: tensorwise (current scaling) or delayed (amax history)."""
    fp8_amax_history_len: int = 1024
    """delayed recipe only."""
    fp8_bf16_layers_at_start: int = 0
    """Pattern layers kept in BF16 at the start of the stack (0 = none)."""
    fp8_bf16_layers_at_end: int = 0
    fp8_mamba_projections_bf16: bool = False
    """Inside FP8 Mamba layers, run in_proj and out_proj in BF16 (tensorwise recipe only)."""
    fp32_ssm_params: bool = True
    """Keep A_log, D and dt_bias in fp32 through the bf16 wrap, the optimizer and checkpoints."""

    def __post_init__(self) -> None:
        if self.fp8 is None:
            return
        if self.dtype != "bf16":
            raise ConfigError(f"precision.fp8={self.fp8} needs precision.dtype=bf16, got {self.dtype}")
        if min(self.fp8_bf16_layers_at_start, self.fp8_bf16_layers_at_end) < 0:
            raise ConfigError("precision.fp8_bf16_layers_at_start/end must be >= 0")
        if self.fp8_recipe == "delayed" and (self.fp8_bf16_layers_at_start or self.fp8_bf16_layers_at_end):
            raise ConfigError(
                "precision.fp8_recipe=delayed cannot keep layers in BF16 (megatron-core forbids it): "
                "set precision.fp8_bf16_layers_at_start/end to 0 or use fp8_recipe=tensorwise"
            )
        if self.fp8_recipe == "delayed" and self.fp8_mamba_projections_bf16:
            raise ConfigError(
                "precision.fp8_mamba_projections_bf16=true needs precision.fp8_recipe=tensorwise "
                "(delayed scaling reduces amaxes per FP8 region; switching FP8 off inside one is not supported)"
            )


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        positive("optim", lr=self.lr, adam_eps=self.adam_eps)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr}: must be in [0, optim.lr={self.lr}]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}={getattr(self, name)}: must be in [0, 1)")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError("optim.weight_decay and optim.clip_grad must be >= 0 (clip_grad 0 disables clipping)")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    lr_decay_style: Literal["cosine", "WSD", "linear", "constant"] = "cosine"
    lr_warmup_steps: int = 100
    wsd_decay_fraction: float = 0.1
    """WSD only: share of the pretraining steps spent decaying."""
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    anneal_peak_lr_fraction: float = 0.75
    """Annealing phase (a data phase with replay): LR re-warms to this share of optim.lr ..."""
    anneal_warmup_steps: int = 100
    """... over this many steps, then decays to zero over the rest of the phase."""

    def __post_init__(self) -> None:
        if self.lr_warmup_steps < 0 or self.anneal_warmup_steps < 0:
            raise ConfigError("schedule.lr_warmup_steps and schedule.anneal_warmup_steps must be >= 0")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ConfigError(f"schedule.wsd_decay_fraction={self.wsd_decay_fraction}: must be in (0, 1]")
        if not 0 < self.anneal_peak_lr_fraction <= 1:
            raise ConfigError(f"schedule.anneal_peak_lr_fraction={self.anneal_peak_lr_fraction}: must be in (0, 1]")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 1
    """Sequences per micro-batch at the data's longest sequence length; shorter curriculum lengths get
    proportionally more, so a micro-batch holds a constant number of tokens."""
    train_steps: int | None = None
    """None: the run length the data phases define."""
    exit_after_steps: int | None = None
    """Stop (with a checkpoint) after this many steps of this invocation, keeping the schedule of the full run."""
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1
    """full recompute: layers per checkpointed chunk (uniform method)."""
    nonfinite_policy: Literal["skip", "stop"] = "stop"
    """A non-finite loss or grad norm before the optimizer step: skip the step, or stop with exit code 4."""
    max_skipped_steps: int = 10
    eval_interval: int | None = None
    """Validation loss every this many steps (needs data.validation); with data.validation set it is also
    taken at the end of the run and before an anneal phase, interval or not."""
    deterministic: bool = False
    """Deterministic kernels: NCCL ring, cuBLAS workspace, TE attention and Mamba-2 SSD backward without
    atomics, fixed Triton tiles, torch's deterministic algorithms (``distributed.enable_determinism``);
    the Mamba conv1d weight/bias gradients by ordered reductions (``model.deterministic_conv``); with
    packed documents, FlashAttention-2 or unfused attention (``model.build.deterministic_attention_backend``).
    Slower: for verifying resume and layouts bit for bit."""

    def __post_init__(self) -> None:
        positive(
            "train",
            micro_batch_size=self.micro_batch_size,
            train_steps=self.train_steps,
            exit_after_steps=self.exit_after_steps,
            eval_interval=self.eval_interval,
            recompute_num_layers=self.recompute_num_layers,
        )


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    save_interval: int | None = None
    """Steps between checkpoints; None: only at the end and on a signal."""
    save_dir: str | None = None
    """None: <logging.run_dir>/checkpoints."""
    async_save: bool = False
    load: str | None = None
    """A checkpoint to start from when <save_dir> has none yet; once this run has saved, <save_dir>/latest wins."""
    load_weights_only: bool = False
    """Take only the model weights from ``load``, even from a training checkpoint: fresh optimizer, schedule and
    data position (a new phase on trained weights: long-context extension, another data mixture). This run's own
    checkpoints, once it has saved, still resume in full."""
    keep_last: int | None = None
    """Delete older training checkpoints past this many (weights-only ones stay); None keeps all."""
    save_final: bool = True
    """False: no checkpoint when training ends (benchmark and comparison runs); interval, signal and
    ``train.exit_after_steps`` saves still happen."""
    save_initial: bool = False
    """A fresh run first saves its initialized weights as a weights-only ``step-000000``: runs at another
    TP/PP layout (whose own init would differ: megatron seeds per TP/PP rank) or with another recipe
    start from the very same weights with ``checkpoint.load=<save_dir>/step-000000``."""

    def __post_init__(self) -> None:
        positive("checkpoint", save_interval=self.save_interval, keep_last=self.keep_last)
        if self.load_weights_only and not self.load:
            raise ConfigError("checkpoint.load_weights_only=true needs checkpoint.load (the checkpoint to take the "
                              "weights from)")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    tensorboard: bool = True
    wandb_project: str | None = None
    """None disables wandb."""
    wandb_mode: Literal["offline", "online", "disabled"] | None = None
    """None: WANDB_MODE from the environment, else offline."""

    def __post_init__(self) -> None:
        positive("logging", log_interval=self.log_interval)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    build_sample_data: bool = False
    """Build the built-in sample shards when the data sources are missing (configs/tiny.yaml)."""

    def __post_init__(self) -> None:
        m, tp = self.model, self.parallel.tensor_model_parallel_size
        counts = pat.count_layers(m.hybrid_layer_pattern)
        checks = []
        if counts["attention"]:
            checks += [("model.num_attention_heads", m.num_attention_heads), ("model.num_query_groups", m.num_kv_heads)]
        if counts["mamba"]:
            checks += [("model.mamba_num_heads", m.num_mamba_heads), ("model.mamba_num_groups", m.mamba_num_groups)]
        if counts["gdn"]:
            checks += [("the Gated DeltaNet key heads", m.num_gdn_key_heads),
                       ("the Gated DeltaNet value heads", m.num_gdn_value_heads)]
        if counts["mlp"]:
            checks += [("model.ffn_hidden_size", m.ffn_hidden_size)]
        if counts["moe"]:
            checks += [("the expert width (model.moe_ffn_hidden_size)", m.expert_ffn_hidden_size)]
            checks += [("model.moe_shared_expert_size", m.moe_shared_expert_size)] if m.moe_shared_expert_size else []
        self._check_experts(counts["moe"])
        self._check_context_parallel(counts)
        for name, value in checks:
            if value % tp:
                raise ConfigError(
                    f"parallel.tensor_model_parallel_size={tp} does not divide {name}={value}"
                )
        pat.split_stages(m.hybrid_layer_pattern, self.parallel.pipeline_model_parallel_size)
        longest = self.data.longest_seq_len
        if m.attention_window is not None and m.attention_window >= longest:
            raise ConfigError(f"model.attention_window={m.attention_window} is not below the longest training sequence "
                              f"({longest} tokens): it would be full attention; drop it or shorten it")
        if counts["gdn"] and self.train.deterministic and self.data.reset_at_document_boundaries:
            raise ConfigError("train.deterministic with Gated DeltaNet layers ('G') needs data.reset_at_document_boundaries"
                              "=false: megatron's deterministic delta rule (plain torch) has no packed-document path, "
                              "and its packed path runs flash-linear-attention's kernels")
        if self.train.eval_interval and self.data.validation is None:
            raise ConfigError("train.eval_interval needs a data.validation section (held-out sources: "
                              "prepare-data --holdout-fraction F --holdout-output DIR)")
        p = self.precision
        if p.fp8_bf16_layers_at_start + p.fp8_bf16_layers_at_end > m.num_layers:
            raise ConfigError(
                f"precision.fp8_bf16_layers_at_start + _at_end = "
                f"{p.fp8_bf16_layers_at_start + p.fp8_bf16_layers_at_end} exceeds the {m.num_layers} pattern layers"
            )
        if p.fp8:
            from hybrid_megatron.model.fp8_dims import first_problem

            problem = first_problem(m, tp, self.data)
            if problem:
                raise ConfigError(problem)

    def _check_experts(self, moe_layers: int) -> None:
        m, par = self.model, self.parallel
        ep = par.expert_model_parallel_size
        if ep > 1 and not moe_layers:
            raise ConfigError(f"parallel.expert_model_parallel_size={ep} needs MoE layers ('E') in the pattern")
        if moe_layers and m.moe_num_experts % ep:
            raise ConfigError(f"parallel.expert_model_parallel_size={ep} does not divide model.moe_num_experts="
                              f"{m.moe_num_experts}")
        if moe_layers and par.tensor_model_parallel_size > 1 and not par.sequence_parallel:
            raise ConfigError("MoE layers ('E') with tensor parallelism need parallel.sequence_parallel=true "
                              "(megatron's token dispatcher)")

    def _check_context_parallel(self, counts: dict[str, int]) -> None:
        """megatron's context-parallel caps, one line each: Mamba heads and groups per TP rank (its all-to-all
        hands each CP rank whole heads), Gated DeltaNet heads, sequences (and packed documents) in 2 x CP chunks."""
        from hybrid_megatron.model.fp8_dims import seq_len_settings

        m, par = self.model, self.parallel
        cp, tp = par.context_parallel_size, par.tensor_model_parallel_size
        if cp == 1:
            return
        halo = m.mamba_conv_kernel - 1
        if counts["mamba"] and par.mamba_context_parallel == "all_to_all":
            heads, groups = m.num_mamba_heads // tp, m.mamba_num_groups // tp
            if heads % cp:
                raise ConfigError(
                    f"parallel.context_parallel_size={cp}: megatron's Mamba context parallelism gives each CP rank whole "
                    f"heads of the {heads} per TP rank (model.mamba_num_heads {m.num_mamba_heads} / TP {tp}), so CP "
                    f"must divide {heads}: at most {heads} (or parallel.mamba_context_parallel=state_passing)")
            if groups % cp and cp % groups:
                raise ConfigError(f"parallel.context_parallel_size={cp}: the {groups} Mamba groups per TP rank must divide "
                                  f"CP or be divided by it (megatron's Mamba context parallelism)")
        if counts["gdn"] and (m.num_gdn_key_heads % (tp * cp) or m.num_gdn_value_heads % (tp * cp)):
            raise ConfigError(f"parallel.context_parallel_size={cp}: TP {tp} x CP {cp} must divide the Gated DeltaNet "
                              f"key heads ({m.num_gdn_key_heads}) and value heads ({m.num_gdn_value_heads})")
        if counts["attention"] and m.attention_window is not None:
            raise ConfigError(f"parallel.context_parallel_size={cp} with sliding-window attention (model.attention_window="
                              f"{m.attention_window}): Transformer Engine takes windows under context parallelism only "
                              "with its a2a or all_gather exchange, and megatron's is p2p: use full attention or CP 1")
        for name, value in seq_len_settings(self.data):
            if value % (2 * cp):
                raise ConfigError(f"{name}={value}: context parallelism splits every sequence into 2 x CP = {2 * cp} "
                                  "chunks (two per rank, for load balance); use a multiple of it")
            if counts["mamba"] and par.mamba_context_parallel == "state_passing" and value // (2 * cp) < halo:
                raise ConfigError(f"{name}={value}: chunks of {value // (2 * cp)} tokens (2 x CP = {2 * cp} per "
                                  f"sequence) are shorter than the Mamba conv's halo of {halo} tokens")
        if self.data.reset_at_document_boundaries:
            shortest = 2 * cp * halo  # state passing: every chunk of a document holds the conv's halo
            if counts["mamba"] and par.mamba_context_parallel == "state_passing" and (
                    self.data.document_multiple < shortest or self.data.document_multiple % (2 * cp)):
                raise ConfigError(f"parallel.context_parallel_size={cp}: state-passing Mamba CP splits each packed "
                                  f"document into 2 x CP = {2 * cp} chunks of at least the conv's halo ({halo} tokens): "
                                  f"set data.document_multiple to a multiple of {2 * cp} of at least {shortest} "
                                  f"(it is {self.data.document_multiple})")
            if self.data.document_multiple % (2 * cp):
                raise ConfigError(f"parallel.context_parallel_size={cp} with packed documents splits each document into "
                                  f"2 x CP = {2 * cp} chunks: set data.document_multiple to a multiple of {2 * cp} "
                                  f"(it is {self.data.document_multiple}), or data.reset_at_document_boundaries=false")

    @property
    def save_dir(self) -> Path:
        return Path(self.checkpoint.save_dir or Path(self.logging.run_dir) / "checkpoints")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Loads a run YAML, applies ``a.b=c`` overrides, builds and validates the RunConfig.

    The ``data`` section is either the data config itself or the path of a data config YAML
    (relative to the working directory). A ``data=PATH`` override swaps in another data config
    before the ``data.key=value`` overrides apply, whatever their order.
    """
    return run_config_from_dict(load_yaml(path), overrides)


def run_config_from_dict(raw: dict, overrides: list[str] | None = None) -> RunConfig:
    """``load_run_config`` for a mapping already read (a checkpoint's stored run config)."""
    raw = dict(raw)
    overrides = list(overrides or [])
    swaps = [o for o in overrides if o.partition("=")[0] == "data"]
    if swaps:
        raw["data"] = swaps[-1].partition("=")[2]
    if isinstance(raw.get("data"), str):
        raw["data"] = load_yaml(raw["data"])
    raw = apply_overrides(raw, [o for o in overrides if o not in swaps])
    return build(RunConfig, raw)
