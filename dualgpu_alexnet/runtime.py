"""Process-level set-up shared by the entry points: BLAS threads, stop signals, memory."""

from __future__ import annotations

import os
import resource
import signal

from threadpoolctl import threadpool_limits

from .comm import Comm
from .config import Config


def blas_threads_for(config: Config, comm: Comm) -> int:
    """BLAS threads per rank: comm.blas_threads, or cores / ranks on this host (at least 1)."""
    if config.comm.blas_threads > 0:
        return config.comm.blas_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // comm.local_size())


def set_blas_threads(threads: int) -> int:
    """Limit every BLAS library loaded in this process to `threads` threads; returns it."""
    threadpool_limits(limits=threads, user_api="blas")
    return threads


class StopFlag:
    """Set by SIGINT or SIGTERM; the trainer checks it at every step boundary."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux /proc; peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()
