"""The pretraining loop: set-up on megatron-core, then steps until the data phases are done.

Returns a process exit code: 0 done, 75 saved after a preemption signal, 4 stopped on non-finite
loss/grad norm. Every step appends ``{"step", "loss", "grad_norm", "lr", "tokens", ..., "time"}`` to
``<run_dir>/losses.jsonl`` (rank 0), which is what resume checks compare.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import RunConfig
from hybrid_megatron.config_io import dump_yaml
from hybrid_megatron.training import signals

log = logging.getLogger("hybrid_megatron.train")


def _ensure_data(cfg: RunConfig, rank: int) -> None:
    import torch

    missing = [p for p in cfg.data.source_paths().values() if not p.exists()]
    if missing and cfg.build_sample_data and rank == 0:
        from data_pipeline.sample_data import ensure_sample_data

        log.info("sample data missing (%s): building it from the built-in corpus first", missing[0])
        ensure_sample_data()
    torch.distributed.barrier()


def _wrap(cfg: RunConfig, chunks: list) -> list:
    """bf16 wrap with fp32 SSM params, then megatron DDP (grad buffers, distributed-optimizer layout)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from hybrid_megatron.model.fp32_params import wrap_half_keep_ssm_fp32

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # our finite check decides (skip or stop), not an exception
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        if cfg.precision.dtype == "bf16":
            chunk = wrap_half_keep_ssm_fp32(chunk.config, chunk) if cfg.precision.fp32_ssm_params else _half(chunk)
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
            )
        )
    return wrapped


def _half(chunk):
    from megatron.core.transformer.module import Float16Module

    return Float16Module(chunk.config, chunk)


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
    return get_megatron_optimizer(opt_config, model_chunks, config_overrides=_param_group_overrides(opt_config))


def _param_group_overrides(opt_config) -> dict:
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


def _wire_grad_sync(model_chunks: list) -> None:
    from megatron.core.distributed import finalize_model_grads

    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [m.no_sync for m in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if model_chunks[0].ddp_config.overlap_grad_reduce:
        sync = [m.start_grad_sync for m in model_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if model_chunks[0].ddp_config.overlap_param_gather:
        gather = [m.start_param_sync for m in model_chunks]
        config.param_sync_func = gather[0] if len(gather) == 1 else gather


def pretrain(cfg: RunConfig) -> int:
    """Trains until the data phases (or train.train_steps) are done; returns the process exit code."""
    # handlers first: a signal while the model is built or a checkpoint loads is acted on at the first step
    with signals.PreemptionHandler() as preempt:
        return _train(cfg, preempt)


def _train(cfg: RunConfig, preempt: signals.PreemptionHandler) -> int:
    import torch
    from megatron.core import parallel_state

    from data_pipeline.loader import build_loader, config_vocab_size
    from data_pipeline.schedule import build_schedule
    from hybrid_megatron.model.build import build_model_chunks, padded_vocab_size
    from hybrid_megatron.model.flops import training_flops_per_token
    from hybrid_megatron.training import distributed
    from hybrid_megatron.training.checkpointer import Checkpointer
    from hybrid_megatron.training.loss_log import LossLog
    from hybrid_megatron.training.lr import PhasedScheduler, run_plan
    from hybrid_megatron.training.metrics import LossWindow, MetricsLogger
    from hybrid_megatron.training.step import micro_batch_plan, train_step

    ranks = distributed.initialize(cfg)
    is_rank0 = ranks.rank == 0
    run_dir = Path(cfg.logging.run_dir)
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    _ensure_data(cfg, ranks.rank)

    data_vocab = config_vocab_size(cfg.data)
    vocab = cfg.model.vocab_size or data_vocab
    if vocab < data_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab})")
    schedule = build_schedule(cfg.data)
    max_seq_len = int(schedule.seq_len.max())
    total_steps, lr_segments = run_plan(cfg, schedule)

    micro_batch_plan(cfg, schedule, parallel_state.get_data_parallel_world_size())  # fails before the build
    chunks = build_model_chunks(cfg, vocab, max_seq_len)
    model = _wrap(cfg, chunks)
    _wire_grad_sync(model)
    optimizer = build_optimizer(cfg, model)
    scheduler = PhasedScheduler(optimizer, lr_segments, cfg.optim.weight_decay)
    checkpointer = Checkpointer(cfg, model, optimizer, scheduler)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    loader = build_loader(cfg.data, dp_rank, dp_size)

    step = 0
    resume = checkpointer.find_resume_point()
    if resume is not None:
        state = checkpointer.load(resume)
        if state:
            step = int(state["step"])
            loader.load_state_dict(state["data"])
    resumed_own = resume is not None and resume.parent.resolve() == cfg.save_dir.resolve()
    if step == 0 and cfg.checkpoint.save_initial and not resumed_own:  # not again after a requeue
        checkpointer.save_weights(0)
    padded = padded_vocab_size(vocab, cfg.model, cfg.parallel.tensor_model_parallel_size)
    metrics = MetricsLogger(
        cfg,
        enabled=is_rank0,
        flops_per_token_at=lambda s: training_flops_per_token(cfg.model, padded, s),
        world_size=ranks.world_size,
        device_name=torch.cuda.get_device_name(),
        start_step=step,
    )
    losses = LossLog(run_dir / "losses.jsonl", resume_step=step) if is_rank0 else None
    skipped_total, window_steps, started_at = 0, 0, step
    window_loss = LossWindow()
    code = 0

    def train_state() -> dict:
        return {"step": step, "data": loader.state_dict(), "world_size": ranks.world_size,
                "skipped_steps": skipped_total}

    for model_chunk in model:
        model_chunk.train()
    while step < total_steps:
        batch = next(loader)
        assert batch.step == step, f"loader at step {batch.step}, trainer at {step}"
        result = train_step(batch, model, optimizer, scheduler, cfg, max_seq_len)
        step += 1
        window_steps += 1
        window_loss.add(result.loss, result.tokens, result.skipped)
        metrics.record(step, batch.seq_len, result.tokens)
        if losses is not None:
            losses.write({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                          "lr": scheduler.current_lr(), "tokens": result.tokens, "seq_len": batch.seq_len,
                          "phase": batch.phase, "skipped": result.skipped})
        if result.skipped:
            skipped_total += 1
            log.warning("step %d: non-finite loss %s / grad norm %s: update skipped", step, result.loss,
                        result.grad_norm)
            if cfg.train.nonfinite_policy == "stop" or skipped_total > cfg.train.max_skipped_steps:
                log.error("stopping on a non-finite loss or grad norm at step %d (train.nonfinite_policy=%s, "
                          "%d skipped)", step, cfg.train.nonfinite_policy, skipped_total)
                code = signals.EXIT_NONFINITE
                break
        if step % cfg.logging.log_interval == 0 or step == total_steps:
            metrics.log(step, total_steps, {"phase": batch.phase, "loss": window_loss.close(),
                                            "grad_norm": result.grad_norm or 0.0, "lr": scheduler.current_lr(),
                                            "seq_len": batch.seq_len, "window_steps": window_steps})
            window_steps = 0
        checkpointer.maybe_finalize()
        interval = cfg.checkpoint.save_interval
        if preempt.agreed():
            checkpointer.save(step, train_state())
            code = signals.EXIT_PREEMPTED
            break
        if cfg.train.exit_after_steps and step - started_at >= cfg.train.exit_after_steps and step < total_steps:
            checkpointer.save(step, train_state())
            log.info("stopping after %d steps of this run (train.exit_after_steps)", step - started_at)
            break
        if (interval and step % interval == 0) or (step == total_steps and cfg.checkpoint.save_final):
            checkpointer.save(step, train_state())
    checkpointer.finalize()
    loader.close()
    metrics.close()
    if losses is not None:
        losses.close()
    if code == signals.EXIT_PREEMPTED:
        log.warning("checkpointed at step %d after a signal: exiting with %d (requeue)", step, code)
    distributed.shutdown()
    return code
