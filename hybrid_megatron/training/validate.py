"""Validation loss in the loop: forward only, through megatron's pipeline schedule, at any TP/PP/DP.

Every evaluation runs the same windows (``data_pipeline.validation.ValidationSet``: fixed per config and
data, split over DP ranks identically for every DP size), one source at a time, in micro-batches of the
training's token budget. The loss is a sum over every validation token (DP-reduced, shared along PP so
every rank holds it), divided by the token count: overall and per source. Rank 0 appends
``{"step", "tokens", "loss", "loss_by_source", "seconds"}`` to ``<run_dir>/val.jsonl``; a resumed run
drops the records past its resume step, so each evaluation appears once.
"""

from __future__ import annotations

import time
from pathlib import Path

from hybrid_megatron.config import RunConfig

VAL_LOG = "val.jsonl"


def evaluation_due(step: int, total_steps: int, interval: int | None, next_phase_is_anneal: bool) -> bool:
    """After ``step`` steps: every ``interval`` steps, at the end of the run, and right before an anneal."""
    return bool(interval and step % interval == 0) or step == total_steps or next_phase_is_anneal


class Validator:
    def __init__(self, cfg: RunConfig, max_seq_len: int, resume_step: int, is_rank0: bool, training_tokenizer=None):
        from megatron.core import parallel_state

        from data_pipeline.validation import ValidationSet
        from hybrid_megatron.training.loss_log import LossLog

        self.cfg = cfg
        self.data = ValidationSet(cfg.data, parallel_state.get_data_parallel_rank(),
                                  parallel_state.get_data_parallel_world_size(), max_seq_len, training_tokenizer)
        self.max_seq_len = max(max_seq_len, self.data.seq_len)
        self.log = LossLog(Path(cfg.logging.run_dir) / VAL_LOG, resume_step=resume_step) if is_rank0 else None
        self._cached = None

    def due(self, step: int, total_steps: int, next_phase_is_anneal: bool) -> bool:
        return evaluation_due(step, total_steps, self.cfg.train.eval_interval, next_phase_is_anneal)

    def evaluate(self, model_chunks, step: int) -> dict:
        """Runs the validation set; returns (and on rank 0 logs) the record."""
        start = time.perf_counter()
        for chunk in model_chunks:
            chunk.eval()
        try:
            if self._cached is None:  # the windows never change: read them once
                self._cached = list(self.data.batches())
            sums = loss_by_source(self._cached, model_chunks, self.cfg, self.max_seq_len)
        finally:
            for chunk in model_chunks:
                chunk.train()
        record = {"step": step, **summarize(sums), "seconds": round(time.perf_counter() - start, 3)}
        if self.log is not None:
            self.log.write(record)
        return record

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def loss_by_source(batches, model_chunks, cfg, max_seq_len: int) -> dict[str, tuple[float, float]]:
    """Forward only over validation batches (one source each): source -> (loss sum, loss tokens), summed over
    every rank's windows and the same on every rank."""
    import torch

    from hybrid_megatron.training.step import forward_backward

    sums = {}
    with torch.no_grad():
        for batch in batches:
            sums[batch.sources[0]] = forward_backward(batch, model_chunks, cfg, max_seq_len, forward_only=True)
    return sums


def summarize(sums: dict[str, tuple[float, float]]) -> dict:
    """{"tokens", "loss", "loss_by_source"}: the mean over every token, and per source."""
    total_loss = sum(s for s, _ in sums.values())
    total_tokens = sum(n for _, n in sums.values())
    return {"tokens": int(total_tokens), "loss": total_loss / max(total_tokens, 1.0),
            "loss_by_source": {k: s / max(n, 1.0) for k, (s, n) in sorted(sums.items())}}
