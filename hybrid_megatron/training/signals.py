"""Preemption: SIGTERM / SIGUSR1 set a flag; all ranks agree on it at a step boundary; save; exit 75.

SLURM sends the signal (``--signal=B:USR1@N`` forwarded by the batch script, or TERM at the time
limit) to every task, but not at the same instant: the flag is OR-reduced over all ranks before it is
acted on, so every rank saves at the same step.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved after a signal, requeue me
EXIT_NONFINITE = 4  # stopped on a non-finite loss or grad norm


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        self._unblocked: list[signal.Signals] = []

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # a blocked signal mask is inherited through fork and exec: a launcher (or a test harness) that
        # blocks these signals would leave the notice pending forever and the job would train on until killed
        self._unblocked = sorted(set(self.SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, []))
        if self._unblocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._unblocked)
            log.warning("%s arrived blocked from the launching process: unblocked, so a preemption notice "
                        "reaches training", "/".join(s.name for s in self._unblocked))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._unblocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._unblocked)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: will checkpoint and exit at the end of this step", signal.Signals(signum).name)
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a signal (a collective: call on all ranks)."""
        import torch

        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self.received is not None else 0], device=device, dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
