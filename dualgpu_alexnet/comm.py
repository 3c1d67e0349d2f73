"""Communication between devices: the only module that imports mpi4py.

Every collective here uses mpi4py's buffer (uppercase) calls on C-contiguous arrays of a checked
dtype, receives into preallocated buffers, and is timed and counted as a `CommEvent` tagged with the
layer, the operation and the direction. On a one-rank communicator every operation is an identity
that moves nothing, so the same model code is the one-process reference.

Failure handling lives here too: `install_abort_on_exception` makes an exception on any rank end
the whole job (a rank waiting in a collective would otherwise hang forever), and a watchdog thread
aborts a collective stuck longer than its timeout, naming the layer and operation.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from mpi4py import MPI

T = TypeVar("T")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint8),
           np.dtype(np.int32), np.dtype(np.int64))


@dataclass
class CommEvent:
    """One timed communication call."""

    step: int
    layer: str
    op: str
    direction: str  # "fwd", "bwd" or "ctl"
    nbytes: int  # bytes this rank sent
    start: float  # perf_counter() at the start of the call
    seconds: float


def _checked(x: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{where}: expected a NumPy array, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{where}: dtype {x.dtype} cannot be sent (use one of "
                         f"{', '.join(str(d) for d in _DTYPES)})")
    if not x.flags.c_contiguous:
        raise ValueError(f"{where}: array of shape {x.shape} is not C-contiguous; a transposed "
                         "view would be sent in the wrong element order")
    return x


class AgreedError(ValueError):
    """Bad input that every rank knows about (raised on all of them by `Comm.agree`)."""


class Comm:
    """Collectives over one MPI communicator, with accounting; identities on one rank.

    Args:
        mpi_comm: an mpi4py communicator (default: COMM_WORLD).
        watchdog_seconds: abort the job if one call blocks longer than this (0 = off).
    """

    coordinator = 0

    def __init__(self, mpi_comm: MPI.Comm | None = None, watchdog_seconds: float = 0.0):
        self._comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank: int = self._comm.Get_rank()
        self.size: int = self._comm.Get_size()
        self.step = -1  # tag for events; the trainer sets it
        self.events: list[CommEvent] = []
        self._buffers: dict[tuple, np.ndarray] = {}
        self._inflight: tuple[str, str, str, float] | None = None
        self._watchdog_seconds = 0.0
        self.start_watchdog(watchdog_seconds)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator

    # -- bookkeeping -------------------------------------------------------------------------

    def _buffer(self, key: tuple, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        full_key = (*key, tuple(shape), np.dtype(dtype).str)
        buf = self._buffers.get(full_key)
        if buf is None:
            buf = self._buffers[full_key] = np.empty(shape, dtype)
        return buf

    def _run(self, layer: str, op: str, direction: str, nbytes: int, call) -> None:
        start = time.perf_counter()
        self._inflight = (layer, op, direction, start)
        try:
            call()
        finally:
            self._inflight = None
        self.events.append(CommEvent(self.step, layer, op, direction, nbytes, start,
                                     time.perf_counter() - start))

    def start_watchdog(self, seconds: float) -> None:
        """Abort the job when one call blocks longer than `seconds` (0 = off; once per Comm)."""
        if seconds > 0 and self.size > 1 and self._watchdog_seconds == 0:
            self._watchdog_seconds = seconds
            threading.Thread(target=self._watch, name="comm-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self._watchdog_seconds / 4))
            inflight = self._inflight
            if inflight is None:
                continue
            layer, op, direction, start = inflight
            waited = time.perf_counter() - start
            if waited > self._watchdog_seconds and self._inflight is inflight:
                abort(f"watchdog: {op} at {layer} ({direction}, step {self.step}) has waited "
                      f"{waited:.0f} s > comm.watchdog_seconds={self._watchdog_seconds:g}; "
                      "another rank is stuck or gone", self.rank)

    def take_events(self) -> list[CommEvent]:
        """Return the events recorded so far and start a new list."""
        events, self.events = self.events, []
        return events

    # -- collectives -------------------------------------------------------------------------

    def allgather(self, x: np.ndarray, layer: str, direction: str = "fwd") -> np.ndarray:
        """Every rank's `x` stacked in rank order: (size, *x.shape). Identity view on one rank."""
        _checked(x, f"allgather at {layer}")
        if self.size == 1:
            return x[None]
        out = self._buffer(("allgather", layer, direction), (self.size, *x.shape), x.dtype)
        self._run(layer, "allgather", direction, x.nbytes * (self.size - 1),
                  lambda: self._comm.Allgather(x, out))
        return out

    def reduce_scatter(self, parts: np.ndarray, layer: str, direction: str = "bwd") -> np.ndarray:
        """Sum `parts` (size, *shape) over ranks and keep this rank's part: (*shape)."""
        _checked(parts, f"reduce_scatter at {layer}")
        if parts.shape[0] != self.size:
            raise ValueError(f"reduce_scatter at {layer}: leading axis {parts.shape[0]} != "
                             f"world size {self.size}")
        if self.size == 1:
            return parts[0]
        out = self._buffer(("reduce_scatter", layer, direction), parts.shape[1:], parts.dtype)
        self._run(layer, "reduce_scatter", direction, parts[0].nbytes * (self.size - 1),
                  lambda: self._comm.Reduce_scatter_block(parts, out, op=MPI.SUM))
        return out

    def gather(self, x: np.ndarray, layer: str, direction: str = "fwd",
               root: int = 0) -> np.ndarray | None:
        """Every rank's `x` stacked at `root` as (size, *x.shape); None on the other ranks."""
        _checked(x, f"gather at {layer}")
        if self.size == 1:
            return x[None]
        out = (self._buffer(("gather", layer, direction), (self.size, *x.shape), x.dtype)
               if self.rank == root else None)
        sent = 0 if self.rank == root else x.nbytes
        self._run(layer, "gather", direction, sent, lambda: self._comm.Gather(x, out, root=root))
        return out

    def scatter(self, parts: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype,
                layer: str, direction: str = "bwd", root: int = 0) -> np.ndarray:
        """Part r of `parts` (size, *shape), given at `root`, lands on rank r."""
        if self.rank == root:
            _checked(parts, f"scatter at {layer}")
            if parts.shape != (self.size, *shape) or parts.dtype != np.dtype(dtype):
                raise ValueError(f"scatter at {layer}: got {parts.shape} {parts.dtype}, "
                                 f"expected {(self.size, *shape)} {np.dtype(dtype)}")
        if self.size == 1:
            return parts[0]
        out = self._buffer(("scatter", layer, direction), shape, dtype)
        sent = parts[0].nbytes * (self.size - 1) if self.rank == root else 0
        self._run(layer, "scatter", direction, sent,
                  lambda: self._comm.Scatter(parts, out, root=root))
        return out

    def bcast(self, x: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype,
              layer: str, direction: str = "ctl", root: int = 0) -> np.ndarray:
        """`x` from `root` to every rank (the others pass None and get a fresh array)."""
        if self.rank == root:
            _checked(x, f"bcast of {layer}")
            if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
                raise ValueError(f"bcast of {layer}: got {x.shape} {x.dtype}, expected "
                                 f"{tuple(shape)} {np.dtype(dtype)}")
        if self.size == 1:
            return x
        buf = x if self.rank == root else np.empty(shape, dtype)
        sent = buf.nbytes * (self.size - 1) if self.rank == root else 0
        self._run(layer, "bcast", direction, sent, lambda: self._comm.Bcast(buf, root=root))
        return buf

    def shift(self, x: np.ndarray, offset: int, layer: str, direction: str) -> np.ndarray:
        """Send `x` to rank + offset and return what rank - offset sent (zeros past the ends)."""
        _checked(x, f"shift at {layer}")
        out = self._buffer(("shift", layer, direction, offset), x.shape, x.dtype)
        dest, source = self.rank + offset, self.rank - offset
        dest = dest if 0 <= dest < self.size else MPI.PROC_NULL
        source = source if 0 <= source < self.size else MPI.PROC_NULL
        if source == MPI.PROC_NULL:
            out.fill(0)  # nobody sends: an edge of the channel range
        sent = x.nbytes if dest != MPI.PROC_NULL else 0
        self._run(layer, "shift", direction, sent,
                  lambda: self._comm.Sendrecv(x, dest, 0, out, source, 0))
        return out

    def allreduce_max(self, x: np.ndarray, layer: str = "flags") -> np.ndarray:
        """Element-wise maximum over ranks of a small float64 vector."""
        return self._allreduce(x, MPI.MAX, layer)

    def allreduce_sum(self, x: np.ndarray, layer: str = "metrics") -> np.ndarray:
        """Element-wise sum over ranks of a small float64 vector."""
        return self._allreduce(x, MPI.SUM, layer)

    def _allreduce(self, x: np.ndarray, op: MPI.Op, layer: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        if self.size == 1:
            return x
        out = np.empty_like(x)
        self._run(layer, "allreduce", "ctl", x.nbytes, lambda: self._comm.Allreduce(x, out, op=op))
        return out

    def barrier(self) -> None:
        if self.size > 1:
            self._run("barrier", "barrier", "ctl", 0, self._comm.Barrier)

    def bcast_text(self, text: str | None, layer: str, root: int = 0) -> str:
        """A string from `root` to every rank (length first, then UTF-8 bytes)."""
        data = np.frombuffer(text.encode(), np.uint8) if self.rank == root else None
        n = self.bcast(np.array([0 if data is None else data.size], np.int64), (1,), np.int64,
                       layer)
        if self.rank == root:
            payload = data.copy() if data.size else np.zeros(0, np.uint8)
        else:
            payload = None
        return bytes(self.bcast(payload, (int(n[0]),), np.uint8, layer)).decode()

    def agree(self, error: str | None) -> None:
        """Raise the coordinator's error message as AgreedError on every rank (None: nothing).

        Coordinator-only work (reading files) reports bad input through this, so the other ranks
        stop with it instead of waiting for a collective that will never come.
        """
        text = self.bcast_text(error or "", "error")
        if text:
            raise AgreedError(text)

    def on_coordinator(self, work: Callable[[], T],
                       errors: tuple[type[BaseException], ...] = (ValueError,)) -> T | None:
        """Run `work()` on the coordinator only; its bad-input error stops every rank alike.

        Returns:
            work()'s result on the coordinator, None elsewhere. An exception of a type in
            `errors` is raised as AgreedError (same message) on every rank.
        """
        result, error = None, None
        if self.is_coordinator:
            try:
                result = work()
            except errors as e:
                error = str(e)
        self.agree(error)
        return result

    def local_size(self) -> int:
        """Ranks of this communicator on this host."""
        if self.size == 1:
            return 1
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()


def abort(message: str, rank: int) -> None:
    """Print `message` once, naming the rank, and end every rank of the job now."""
    sys.stderr.write(f"[rank {rank}] {message}\n")
    sys.stderr.flush()
    if MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Abort(1)
    os._exit(1)


def install_abort_on_exception(rank: int) -> None:
    """Make an uncaught exception on this rank print its traceback once and end the whole job.

    Without this, the other ranks wait in their next collective forever under plain `mpirun`.
    """
    if MPI.COMM_WORLD.Get_size() == 1:
        return

    def hook(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        abort(f"failed, ending the job:\n{text.rstrip()}", rank)

    sys.excepthook = hook
    threading.excepthook = lambda args: hook(args.exc_type, args.exc_value, args.exc_traceback)


def world(watchdog_seconds: float = 0.0) -> Comm:
    """The job's communicator (one rank under plain `python`)."""
    return Comm(MPI.COMM_WORLD, watchdog_seconds)


def alone() -> Comm:
    """A one-rank communicator of this process only (a one-process reference inside a job)."""
    return Comm(MPI.COMM_SELF)
