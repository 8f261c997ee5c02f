"""The pretraining loop: the training state from ``training/setup.py``, then steps until the data phases
are done; the loader workers, metrics writers and process group are closed however the loop ends.

Returns a process exit code: 0 done, 75 saved after a preemption signal, 4 stopped on non-finite
loss/grad norm. Every step appends ``{"step", "loss", "grad_norm", "lr", "tokens", ..., "time"}`` to
``<run_dir>/losses.jsonl`` (rank 0), which is what resume checks compare.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hybrid_megatron.config import RunConfig
from hybrid_megatron.config_io import dump_yaml
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.training import signals

log = logging.getLogger("hybrid_megatron.train")


def pretrain(cfg: RunConfig) -> int:
    """Trains until the data phases (or train.train_steps) are done; returns the process exit code."""
    # handlers first: a signal while the model is built or a checkpoint loads is acted on at the first step
    with signals.PreemptionHandler() as preempt:
        return _train(cfg, preempt)


def _train(cfg: RunConfig, preempt: signals.PreemptionHandler) -> int:
    from hybrid_megatron.training import distributed

    ranks = distributed.initialize(cfg)
    try:
        if ranks.rank == 0:
            run_dir = Path(cfg.logging.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        from hybrid_megatron.training.setup import build_train_state

        state = build_train_state(cfg, ranks.rank)
        try:
            return _run(state, ranks, preempt)
        finally:
            state.close()
    finally:
        distributed.shutdown()


def _run(state, ranks, preempt: signals.PreemptionHandler) -> int:
    """Steps from the resume point to the end of the plan; returns the exit code."""
    import torch

    from data_pipeline.schedule import step_input_tokens
    from hybrid_megatron.model.flops import training_flops_per_token
    from hybrid_megatron.training.loss_log import LossLog
    from hybrid_megatron.training.metrics import LossWindow, MetricsLogger, padding_dropped
    from hybrid_megatron.training.step import train_step

    cfg, model, loader, checkpointer = state.cfg, state.model, state.loader, state.checkpointer
    optimizer, scheduler, total_steps, step = state.optimizer, state.scheduler, state.total_steps, state.step
    is_rank0 = ranks.rank == 0
    if step == 0 and cfg.checkpoint.save_initial and not state.resumed_own:  # not again after a requeue
        checkpointer.save_weights(0)
    metrics = MetricsLogger(
        cfg,
        enabled=is_rank0,
        flops_per_token_at=lambda s: training_flops_per_token(cfg.model, state.padded_vocab_size, s),
        world_size=ranks.world_size,
        device_name=torch.cuda.get_device_name(),
        start_step=step,
    )
    losses = LossLog(Path(cfg.logging.run_dir) / "losses.jsonl", resume_step=step) if is_rank0 else None
    validator = None
    if cfg.data.validation is not None:
        from hybrid_megatron.training.validate import Validator

        validator = Validator(cfg, state.max_seq_len, resume_step=step, is_rank0=is_rank0,
                              training_tokenizer=state.data_tokenizer)
    router_stats = None
    if pat.MOE in cfg.model.hybrid_layer_pattern:
        from hybrid_megatron.training.moe_stats import RouterStats

        router_stats = RouterStats(model, cfg)
    skipped_total, window_steps, started_at = 0, 0, step
    window_dropped = window_tokens = 0  # tokens document padding pushed out of this rank's rows (data.document_multiple)
    window_loss = LossWindow()
    code = 0

    def train_state() -> dict:
        return {"step": step, "data": loader.state_dict(), "world_size": ranks.world_size,
                "skipped_steps": skipped_total}

    try:
        for model_chunk in model:
            model_chunk.train()
        while step < total_steps:
            batch = next(loader)
            assert batch.step == step, f"loader at step {batch.step}, trainer at {step}"
            result = train_step(batch, model, optimizer, scheduler, cfg, state.max_seq_len)
            if router_stats is not None:
                router_stats.step_end()
            step += 1
            window_steps += 1
            window_loss.add(result.loss, result.tokens, result.skipped)
            input_tokens = step_input_tokens(cfg.data, batch.seq_len)
            metrics.record(step, batch.seq_len, input_tokens)
            window_dropped, window_tokens = window_dropped + batch.dropped_tokens, window_tokens + batch.num_tokens
            if losses is not None:
                losses.write({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                              "lr": scheduler.current_lr(), "tokens": result.tokens, "input_tokens": input_tokens,
                              "seq_len": batch.seq_len, "phase": batch.phase, "skipped": result.skipped})
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
                                                "seq_len": batch.seq_len, "window_steps": window_steps,
                                                **padding_dropped(cfg, window_dropped, window_tokens),
                                                **(router_stats.summary() if router_stats is not None else {})})
                window_steps = window_dropped = window_tokens = 0
            if validator is not None and validator.due(step, total_steps, step == state.anneal_start):
                checkpointer.sync_params()  # overlapped param gather: this step's weights on every rank
                metrics.log_validation(validator.evaluate(model, step))
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
    finally:
        metrics.close()
        if losses is not None:
            losses.close()
        if validator is not None:
            validator.close()
    if code == signals.EXIT_PREEMPTED:
        log.warning("checkpointed at step %d after a signal: exiting with %d (requeue)", step, code)
    return code
