"""Console, TensorBoard and wandb logging of training metrics (rank 0 only).

loss is the token-weighted mean over the logging window (``LossWindow``, as Megatron-LM logs it);
tokens/s counts input tokens of the global batch (every token the model runs on, loss-masked or not) over the wall
time of the logging window;
TFLOP/s/GPU = tokens/s x model FLOPs per token (``model.flops``, recompute excluded) / GPUs;
MFU = that over the GPU's dense BF16 peak.
"""

from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger("hybrid_megatron.train")

# Dense BF16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0}


class LossWindow:
    """The loss a log line shows: the token-weighted mean over the steps since the previous line, as
    Megatron-LM logs it (one step's loss is noisy at small batches; ``losses.jsonl`` keeps every step).
    Skipped (non-finite) steps do not count."""

    def __init__(self) -> None:
        self._sum, self._tokens = 0.0, 0

    def add(self, loss: float, tokens: int, skipped: bool = False) -> None:
        if not skipped and math.isfinite(loss) and tokens > 0:
            self._sum += loss * tokens
            self._tokens += tokens

    def close(self) -> float:
        """The window's mean (NaN when every step of it was skipped); starts the next window."""
        mean = self._sum / self._tokens if self._tokens else float("nan")
        self._sum, self._tokens = 0.0, 0
        return mean


def padding_dropped(cfg, dropped: int, tokens: int) -> dict:
    """The log line's share of this rank's row tokens that document padding (``data.document_multiple``) pushed
    out of the rows since the last line, untrained; nothing when documents are not padded."""
    if cfg.data.document_multiple == 1:
        return {}
    return {"pad_dropped": dropped / tokens if tokens else 0.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def _wandb_run_id(run_dir: str) -> str:
    """One wandb run per run directory: a requeued or resumed job continues the same run."""
    import secrets

    path = os.path.join(run_dir, "wandb_run_id")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(secrets.token_hex(8) + "\n")
    with open(path) as f:
        return f.read().strip()


class MetricsLogger:
    def __init__(self, cfg, enabled: bool, flops_per_token_at, world_size: int, device_name: str,
                 start_step: int = 0):
        self.cfg = cfg
        self.enabled = enabled
        self.flops_per_token_at = flops_per_token_at  # seq_len -> training FLOPs per token
        self.world_size = world_size
        self.peak = peak_tflops(device_name)
        if enabled and self.peak is None:
            log.warning("unknown GPU %r: MFU is not reported (TFLOP/s/GPU still is)", device_name)
        self._tb = None
        self._wandb = None
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        self._window_flops = 0.0
        if not enabled:
            return
        run_dir = cfg.logging.run_dir
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events a previous attempt logged past its checkpoint
            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
        if cfg.logging.wandb_project:
            import wandb

            from hybrid_megatron.config_io import to_dict

            mode = cfg.logging.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
            self._wandb = wandb.init(
                project=cfg.logging.wandb_project, dir=run_dir, mode=mode, config=to_dict(cfg),
                id=_wandb_run_id(run_dir), resume="allow",
            )

    def record(self, step: int, seq_len: int, tokens: int) -> None:
        """Counts a step's input tokens (all data-parallel ranks, loss-masked ones included: the work done) into
        the current window (every rank may call; cheap)."""
        self._window_tokens += tokens
        self._window_flops += tokens * self.flops_per_token_at(seq_len)

    def log(self, step: int, total_steps: int, values: dict) -> dict:
        """Closes the window and writes one line + TB/wandb scalars; returns the derived rates."""
        import torch

        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / elapsed
        tflops = self._window_flops / elapsed / self.world_size / 1e12
        rates = {"tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops}
        if self.peak:
            rates["mfu"] = tflops / self.peak
        rates["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        self._window_start, self._window_tokens, self._window_flops = now, 0, 0.0
        if not self.enabled:
            return rates
        eta_s = (total_steps - step) * elapsed / max(values.pop("window_steps", 1), 1)
        line = " | ".join(
            [f"step {step}/{total_steps}"]
            + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
            + [f"tok/s {tokens_per_s:,.0f}", f"TFLOP/s/GPU {tflops:.1f}"]
            + ([f"MFU {rates['mfu']:.1%}"] if "mfu" in rates else [])
            + [f"mem {rates['mem_gib']:.1f}GiB", f"ETA {eta_s / 60:.1f}min"]
        )
        log.info(line)
        scalars = {**{k: v for k, v in values.items() if isinstance(v, (int, float))}, **rates}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        return rates

    def log_validation(self, record: dict) -> None:
        """One console line and the val/ scalars of an evaluation; its time is left out of the train rates."""
        self._window_start += record["seconds"]
        if not self.enabled:
            return
        by_source = record["loss_by_source"]
        log.info(" | ".join([f"validation at step {record['step']}", f"loss {record['loss']:.4f}",
                             *(f"{k} {v:.4f}" for k, v in by_source.items()),
                             f"{record['tokens']:,} loss tokens in {record['seconds']:.1f}s"]))
        scalars = {"val/loss": record["loss"], **{f"val/loss/{k}": v for k, v in by_source.items()}}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
