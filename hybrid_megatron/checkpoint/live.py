"""Saving and loading the live training state through megatron's dist_checkpointing (torch_dist).

The directory protocol (tmp dir, rename, ``latest``) is in ``checkpoint/layout.py``; this module builds the
sharded state dicts of model chunks and optimizer, runs the (optionally async) save, and restores
model, optimizer, LR scheduler, RNG and the data-loader state on resume. Loading tolerates a change
of TP/PP/DP (torch_dist reshards); a change of architecture is refused before any tensor is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from data_pipeline.errors import DataError
from hybrid_megatron.config import RunConfig
from hybrid_megatron.config_io import dump_yaml, to_dict
from hybrid_megatron.checkpoint import layout as ckpt
from hybrid_megatron.checkpoint import rng
from hybrid_megatron.checkpoint.architecture import check_architecture
from hybrid_megatron.checkpoint.safe_metadata import read_metadata

log = logging.getLogger(__name__)

# Optimizer state in model space ("fully_reshardable": gathered per DP group on save, sliced per rank
# on load), so a checkpoint reloads at another TP/PP/DP layout. The fp32 SSM params must sit in a
# param group of their own for megatron-core to pair their state correctly (see training/optimizer.py).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _model_sharded_state_dict(model_chunks) -> dict:
    """Sharded state dicts of the bare HybridModel chunks.

    Taken below the DDP / Float16Module wrappers: megatron-core's DDP has no ``sharded_state_dict``
    of its own, so the default recursion would prefix every key with ``module.``. Without the
    wrappers the keys are megatron's own (``decoder.layers.0.mixer.in_proj.weight``), which is what
    the converter reads and what ``convert from-hf`` writes; the tensors are the same objects.
    """
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _async_strategy() -> str:
    """NVIDIA Resiliency Extension's async writer when installed, else megatron-core's own."""
    import importlib.util

    return "nvrx" if importlib.util.find_spec("nvidia_resiliency_ext") else "mcore"


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _apply_model_weights(model_chunks, loaded: dict, step_dir: Path) -> None:
    """Copies loaded model tensors into the bare chunks; refuses a key set that does not match the model."""
    for i, chunk in enumerate(model_chunks):
        weights = loaded["model"] if len(model_chunks) == 1 else loaded[f"model{i}"]
        result = _unwrap(chunk).load_state_dict(weights, strict=False)  # saved from the bare model too
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {step_dir} does not match the model: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")


def load_model_weights(model_chunks, step_dir: Path) -> None:
    """The model tensors of any of our checkpoints (training or weights-only) into ``model_chunks`` at
    this process layout; torch_dist reshards across TP/PP. No optimizer, schedule or RNG state."""
    from megatron.core import dist_checkpointing

    read_metadata(step_dir)  # refuses a crafted .metadata before torch unpickles it
    loaded = dist_checkpointing.load(_model_sharded_state_dict(model_chunks), str(step_dir))
    _apply_model_weights(model_chunks, loaded, step_dir)


class Checkpointer:
    def __init__(self, cfg: RunConfig, model_chunks, optimizer, scheduler, tokenizer: dict | None = None):
        """``tokenizer``: the data's tokenizer record, stored in every step dir (``convert to-hf`` reads it)."""
        import torch

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.save_dir = cfg.save_dir
        self.rank = torch.distributed.get_rank()
        self._async_queue = None
        if cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()

    # ---- save -------------------------------------------------------------------------------------
    def save_weights(self, step: int) -> None:
        """A weights-only checkpoint (what ``convert from-hf`` writes): loading it starts a fresh optimizer,
        schedule and data position. Always synchronous."""
        self.save(step, {"step": step, "weights_only": True}, weights_only=True)

    def save(self, step: int, train_state: dict, weights_only: bool = False) -> None:
        """Saves at ``step``; async saves commit later, in ``maybe_finalize`` / ``finalize``."""
        import torch
        from megatron.core import dist_checkpointing

        self.finalize()  # at most one save in flight
        self.sync_params()
        tmp = self.save_dir / ckpt.tmp_dir_name(step)
        if self.rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale_tmp(self.save_dir)
            tmp.mkdir()
        torch.distributed.barrier()
        state = _model_sharded_state_dict(self.model)
        if not weights_only:
            state["optimizer"] = self.optimizer.sharded_state_dict(state, metadata=_OPTIM_METADATA)
            train_state = {**train_state, "scheduler": self.scheduler.state_dict()}
        background = self._async_queue is not None and not weights_only
        files = ckpt.step_files(dump_yaml(self.cfg), train_state, self.tokenizer)
        request = dist_checkpointing.save(
            state,
            str(tmp),
            async_sharded_save=background,
            content_metadata=_OPTIM_METADATA,
            async_strategy=_async_strategy(),
        )
        # after megatron's save has started (it expects an empty directory), before the commit
        (tmp / "rng").mkdir(exist_ok=True)
        rng.save(tmp / "rng" / f"rank-{self.rank:05d}.pt")

        def _commit():
            if self.rank == 0:
                final = ckpt.commit(self.save_dir, tmp, step, files, self.cfg.checkpoint.keep_last)
                log.info("checkpoint committed: %s", final)

        if request is None:
            torch.distributed.barrier()  # every rank's shards are on disk before the rename
            _commit()
            torch.distributed.barrier()
        else:
            request.add_finalize_fn(_commit)  # runs after all ranks' writes are done
            self._async_queue.schedule_async_request(request)
            log.info("checkpoint of step %d is being written in the background", step)

    def sync_params(self) -> None:
        """With ``overlap_param_gather`` each DP rank holds only its own shard of the last update until the
        next forward all-gathers the rest: gather now, so the saved weights are this step's everywhere
        (megatron's own loop does the same before a save)."""
        if not self.cfg.parallel.overlap_param_gather or self.optimizer is None:
            return
        self.optimizer.prepare_model_params_for_param_sync()
        for chunk in self.model:
            chunk.start_param_sync(force_sync=True)

    def maybe_finalize(self) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=False)

    def finalize(self) -> None:
        """Waits for an async save and its commit; no rank returns before rank 0 has moved ``latest``."""
        import torch

        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=True)
            torch.distributed.barrier()

    # ---- load -------------------------------------------------------------------------------------
    def find_resume_point(self) -> Path | None:
        """``<save_dir>/latest`` when this run has saved before (a requeued job continues its own
        progress), else checkpoint.load (the starting point of a new run), else None."""
        latest = ckpt.read_latest(self.save_dir)
        if latest is not None:
            return latest
        if self.cfg.checkpoint.load:
            return ckpt.resolve_step_dir(self.cfg.checkpoint.load, what="checkpoint.load=")
        return None

    def starts_from_weights(self, step_dir: Path) -> bool:
        """True when ``step_dir`` is checkpoint.load's and only its weights are wanted (checkpoint.load_weights_only);
        never for this run's own checkpoints, which resume in full."""
        own = ckpt.read_latest(self.save_dir)
        return self.cfg.checkpoint.load_weights_only and (own is None or own.resolve() != step_dir.resolve())

    def load(self, step_dir: Path) -> dict:
        """Restores model (+ optimizer, scheduler, RNG unless weights-only or ``starts_from_weights``); returns
        train_state ({} when only weights were taken)."""
        import torch
        from megatron.core import dist_checkpointing

        read_metadata(step_dir)  # refuses a crafted .metadata before torch unpickles it
        saved_cfg = yaml.safe_load((step_dir / ckpt.RUN_CONFIG).read_text())
        check_architecture(saved_cfg.get("model", {}), to_dict(self.cfg.model), step_dir)
        train_state = ckpt.read_train_state(step_dir)
        weights_only = bool(train_state.get("weights_only")) or self.starts_from_weights(step_dir)
        state = _model_sharded_state_dict(self.model)
        if not weights_only:
            state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
        loaded = dist_checkpointing.load(state, str(step_dir))
        _apply_model_weights(self.model, loaded, step_dir)
        if weights_only:
            if self.optimizer is not None:
                # the fp32 main params were copied from the initial weights when the optimizer was built;
                # without this the first step would update (and write back) those, not the loaded ones
                self.optimizer.reload_model_params()
            log.info("loaded weights from %s (fresh optimizer and schedule)", step_dir)
            return {}
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(train_state["scheduler"])
        rng_file = step_dir / "rng" / f"rank-{self.rank:05d}.pt"
        same_layout = (
            saved_cfg.get("parallel") == to_dict(self.cfg.parallel)
            and train_state.get("world_size") == torch.distributed.get_world_size()
            and rng_file.is_file()
        )
        if not same_layout:
            log.warning("parallel layout changed since %s: RNG states start fresh", step_dir)
        else:
            try:
                rng.restore(rng.load(rng_file))
            except DataError as exc:  # an older format or a crafted file: never unpickled beyond the safe loader
                log.warning("%s; RNG states start fresh", exc)
        log.info("resumed from %s at step %d", step_dir, train_state["step"])
        return train_state
