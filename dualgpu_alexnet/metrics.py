"""Top-k error rates, a crash-tolerant JSON-lines writer, and perf_counter timers."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np


def true_class_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each true label when classes are sorted by score, ties by lower index.

    Args:
        scores: (N, C) logits or probabilities.
        labels: (N,) integer class indices in [0, C).
    Returns:
        (N,) int64: the number of classes ranked before the true one (C for rows with a NaN).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {scores.shape}")
    n, c = scores.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match scores {scores.shape}, "
                         f"got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got min {labels.min()} max {labels.max()}")
    true_score = scores[np.arange(n), labels][:, None]  # (N, 1)
    lower_index = np.arange(c)[None, :] < labels[:, None]  # (N, C): ties count if earlier
    before = (scores > true_score) | ((scores == true_score) & lower_index)
    rank = before.sum(axis=1, dtype=np.int64)
    if np.issubdtype(scores.dtype, np.floating):
        rank[np.isnan(scores).any(axis=1)] = c  # a NaN anywhere in a row never counts as right
    return rank


def topk_errors(scores: np.ndarray, labels: np.ndarray,
                ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose true label is not among the k best-scored classes, per k.

    Args:
        scores: (N, C) logits or probabilities (any monotone transform gives the same result).
        labels: (N,) integer class indices.
        ks: the k values; each is clipped to C (so top-5 over 3 classes is 0 error).
    Returns:
        {k: error rate in [0, 1]} keyed by the requested k.
    """
    ks = tuple(ks)
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    rank = true_class_rank(scores, labels)
    if rank.size == 0:
        raise ValueError("topk_errors needs at least one sample, got N = 0")
    c = np.asarray(scores).shape[1]
    return {int(k): float(np.mean(rank >= min(int(k), c))) for k in ks}


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples to JSON types; non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a crash loses at most that line."""

    def __init__(self, path: str | Path) -> None:
        """Open `path` for appending (creating its directory); end a cut-off last line first."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 (closed by close() / __exit__)
        if self._file.tell() > 0:
            self._file.seek(-1, 2)
            if self._file.read(1) != b"\n":  # a crash cut the last line: don't glue onto it
                self._file.write(b"\n")
                self._file.flush()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` as one line of strict JSON (NaN/inf become null) and flush it."""
        if self._file.closed:
            raise ValueError(f"{self.path}: write to a closed JsonlWriter")
        line = json.dumps(to_jsonable(record), allow_nan=False, separators=(",", ":"))
        self._file.write(line.encode() + b"\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_jsonl(path: str | Path, strict: bool = False) -> list[dict[str, Any]]:
    """Read a JSON-lines file.

    Args:
        path: the file.
        strict: raise on a line that is not JSON; by default such lines (cut off by a crash)
            are skipped.
    Returns:
        The records in file order.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if strict:
                    raise ValueError(f"{path}:{number}: not a JSON line: {e}") from None
    return records


class Timer:
    """Seconds since construction or the last `restart` (perf_counter)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self._start

    def restart(self) -> float:
        """Return the elapsed seconds and start again from now."""
        now = self._clock()
        elapsed, self._start = now - self._start, now
        return elapsed


class Stopwatch:
    """Accumulates wall time and counts per named span, e.g. "forward", "allgather", "update"."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` to span `name`."""
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the `with` body into span `name` (also when it raises)."""
        start = self._clock()
        try:
            yield
        finally:
            self.add(name, self._clock() - start)

    def mean(self, name: str) -> float:
        """Mean seconds per occurrence of span `name` (0.0 if never timed)."""
        count = self.counts.get(name, 0)
        return self.totals[name] / count if count else 0.0

    def snapshot(self, reset: bool = False) -> dict[str, float]:
        """Totals per span in seconds (a copy); with reset=True start afresh."""
        totals = dict(self.totals)
        if reset:
            self.totals.clear()
            self.counts.clear()
        return totals
