"""Preemption: SIGTERM / SIGUSR1 set a flag; all ranks agree on it at a step boundary; save; exit 75.

SLURM sends the signal (``--signal=B:USR1@N`` forwarded by the batch script, or TERM at the time
limit) to every task, but not at the same instant: the flag is OR-reduced over all ranks before it is
acted on, so every rank saves at the same step.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import signal

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved after a signal, requeue me
EXIT_NONFINITE = 4  # stopped on a non-finite loss or grad norm


def kernel_handler(sig: int) -> int | None:
    """Address of the handler the kernel runs for ``sig`` (None where it cannot be read).

    ``signal.getsignal`` only knows what Python installed; native code (any C/C++ library loaded later)
    that calls sigaction() itself replaces Python's handler without Python noticing. glibc's
    ``struct sigaction`` starts with the handler pointer, so the first word of the old action is it.
    """
    libc = _libc()
    if libc is None:
        return None
    old = ctypes.create_string_buffer(512)  # larger than struct sigaction on every Linux ABI
    if libc.sigaction(int(sig), None, old) != 0:
        return None
    return ctypes.c_void_p.from_buffer(old).value or 0


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaction  # noqa: B018  (absent outside glibc/musl: no check then)
    except (OSError, AttributeError):
        return None
    return libc


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        self._unblocked: list[signal.Signals] = []
        self._installed: dict[signal.Signals, int | None] = {}
        self._announced = False

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            self._installed[sig] = kernel_handler(sig)
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

    def rearm(self) -> list[str]:
        """Re-installs a handler that native code replaced since (called at every step boundary, before
        the agreement: lazily initialized libraries install theirs during the first steps). Returns
        the names of the signals it re-installed."""
        replaced = [sig for sig, addr in self._installed.items() if addr is not None and kernel_handler(sig) != addr]
        for sig in replaced:
            log.warning("%s: another library replaced this process's handler (native sigaction); re-installed "
                        "so a preemption notice still reaches training", sig.name)
            signal.signal(sig, self._handle)
            self._installed[sig] = kernel_handler(sig)
        return [sig.name for sig in replaced]

    def _handle(self, signum, frame) -> None:
        # only a flag here: a handler that logs can re-enter a stream the interrupted code is writing
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a signal (a collective: call on all ranks)."""
        import torch

        self.rearm()
        if self.received is not None and not self._announced:
            self._announced = True
            log.warning("received %s: checkpointing and exiting at this step", signal.Signals(self.received).name)
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self.received is not None else 0], device=device, dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
