"""The one place a training state is assembled: model chunks (bf16 with fp32 SSM params, megatron DDP),
optimizer, LR schedule, checkpointer, data loader, micro-batch plan and the resume point.

``build_train_state`` is what ``pretrain``, the conversion-fixture tools and the GPU tests use;
``build_training_model`` is the model part alone (the throughput benchmark feeds it synthetic batches).
``load_model_for_inference`` (``training/inference.py``) builds a model without optimizer or loader.
All of them need the process groups of ``distributed.initialize`` and a CUDA device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import ConfigError
from hybrid_megatron.config import RunConfig

log = logging.getLogger(__name__)


def ensure_data(cfg: RunConfig, rank: int) -> None:
    """Builds the sample shards first when the config asks for them and they are missing (rank 0)."""
    import torch

    missing = [str(loc) for loc in cfg.data.source_paths().values() if not loc.remote and not loc.is_dir()]
    if missing and cfg.build_sample_data and rank == 0:
        from data_pipeline.sample_data import ensure_sample_data

        log.info("sample data missing (%s): building it from the built-in corpus first", missing[0])
        ensure_sample_data()
    torch.distributed.barrier()


def wrap_model(cfg: RunConfig, chunks: list) -> list:
    """bf16 wrap with fp32 SSM params, then megatron DDP (grad buffers, distributed-optimizer layout)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # our finite check decides (skip or stop), not an exception
    )
    return [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=half_precision(cfg, chunk),
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def half_precision(cfg: RunConfig, chunk):
    """The bf16 wrap of one chunk (fp32 SSM params restored when configured); fp32 runs stay unwrapped."""
    if cfg.precision.dtype != "bf16":
        return chunk
    if cfg.precision.fp32_ssm_params:
        from hybrid_megatron.model.fp32_params import wrap_half_keep_ssm_fp32

        return wrap_half_keep_ssm_fp32(chunk.config, chunk)
    from megatron.core.transformer.module import Float16Module

    return Float16Module(chunk.config, chunk)


def wire_grad_sync(model_chunks: list) -> None:
    """Hands megatron's pipeline schedule the DDP hooks: grad finalisation, no-sync, overlapped reduce/gather."""
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


def build_training_model(cfg: RunConfig, vocab_size: int, max_seq_len: int) -> list:
    """This rank's model chunks, wrapped for training (bf16 + DDP) and wired to the pipeline schedule."""
    from hybrid_megatron.model.build import build_model_chunks

    model = wrap_model(cfg, build_model_chunks(cfg, vocab_size, max_seq_len))
    wire_grad_sync(model)
    return model


@dataclass
class TrainState:
    """Everything a training run holds, built once by :func:`build_train_state`."""

    cfg: RunConfig
    model: list  # DDP-wrapped model chunks of this rank (one per virtual pipeline stage)
    optimizer: object
    scheduler: object  # training.lr.PhasedScheduler
    checkpointer: object  # checkpoint.live.Checkpointer
    loader: object  # data_pipeline.loader's stateful loader of this DP rank
    schedule: object  # data_pipeline.schedule.Schedule: the per-step plan of the whole run
    total_steps: int
    max_seq_len: int
    vocab_size: int
    padded_vocab_size: int
    micro_batches: dict[int, tuple[int, int]]  # seq_len -> (sequences per micro-batch, micro-batches per step)
    data_tokenizer: object  # data_pipeline.loader.TokenizerInfo shared by every training source
    anneal_start: int | None  # the step the anneal phase's LR segment starts at (None: no anneal in the run)
    step: int = 0  # the step training starts at (after a resume)
    resume_dir: Path | None = None  # the checkpoint it resumed from, if any

    @property
    def resumed_own(self) -> bool:
        """Whether the resume point is this run's own save (a requeue), not ``checkpoint.load``."""
        return self.resume_dir is not None and self.resume_dir.parent.resolve() == self.cfg.save_dir.resolve()

    def close(self) -> None:
        """Stops the loader's workers. No collective here, so it is safe on one failing rank; a finished run
        calls ``checkpointer.finalize()`` first (an unfinished async save is not committed)."""
        self.loader.close()


def build_train_state(cfg: RunConfig, rank: int) -> TrainState:
    """Builds and resumes the training state of this rank (process groups already initialized)."""
    from megatron.core import parallel_state

    from data_pipeline.loader import build_loader, open_sources, tokenizer_info
    from data_pipeline.schedule import build_schedule
    from hybrid_megatron.checkpoint.live import Checkpointer
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.training.lr import PhasedScheduler, run_plan
    from hybrid_megatron.training.optimizer import build_optimizer
    from hybrid_megatron.training.step import micro_batch_plan

    ensure_data(cfg, rank)
    data_tokenizer = tokenizer_info(open_sources(cfg.data))
    data_vocab = data_tokenizer.vocab_size
    vocab = cfg.model.vocab_size or data_vocab
    if vocab < data_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab})")
    schedule = build_schedule(cfg.data)
    max_seq_len = schedule.max_seq_len
    total_steps, lr_segments = run_plan(cfg, schedule)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    micro_batches = micro_batch_plan(cfg, schedule, dp_size)  # fails before the build

    model = build_training_model(cfg, vocab, max_seq_len)
    optimizer = build_optimizer(cfg, model)
    scheduler = PhasedScheduler(optimizer, lr_segments, cfg.optim.weight_decay)
    checkpointer = Checkpointer(cfg, model, optimizer, scheduler,
                                tokenizer={**data_tokenizer.tokenizer, "vocab_size": data_vocab,
                                           "eos_id": data_tokenizer.eos_id})
    loader = build_loader(cfg.data, dp_rank, dp_size)
    state = TrainState(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, checkpointer=checkpointer,
                       loader=loader, schedule=schedule, total_steps=total_steps, max_seq_len=max_seq_len,
                       vocab_size=vocab, padded_vocab_size=padded_vocab_size(vocab, cfg.model,
                                                                             cfg.parallel.tensor_model_parallel_size),
                       micro_batches=micro_batches, data_tokenizer=data_tokenizer,
                       anneal_start=lr_segments[1].start if len(lr_segments) > 1 else None)
    try:
        state.resume_dir = checkpointer.find_resume_point()
        if state.resume_dir is not None:
            saved = checkpointer.load(state.resume_dir)
            if saved:  # empty for a weights-only checkpoint: fresh optimizer, schedule and data position
                state.step = int(saved["step"])
                loader.load_state_dict(saved["data"])
    except BaseException:
        loader.close()
        raise
    return state
