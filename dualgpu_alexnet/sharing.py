"""What the coordinator sends every device: the batch, the dataset statistics, small integers.

The batch crosses as uint8 pixels (crops already taken and flipped) plus, per image, its crop
offset, flip and colour noise as six floats; each device rebuilds the float input itself. On one
process every call returns its input.
"""

from __future__ import annotations

import numpy as np

from .comm import Comm
from .config import Config
from .data import Batch, DataStats


def bcast_ints(comm: Comm, values: list[int] | None, count: int, layer: str) -> list[int]:
    """Small integers from the coordinator to every rank."""
    array = np.array(values, np.int64) if comm.is_coordinator else None
    return [int(v) for v in comm.bcast(array, (count,), np.int64, layer)]


def share_batch(comm: Comm, batch: Batch | None, input_size: int) -> Batch:
    """The coordinator's batch on every rank: uint8 pixels plus (N, 6) crop/flip/noise floats.

    Labels stay at the coordinator (the other ranks get zeros).
    """
    (n,) = bcast_ints(comm, None if batch is None else [len(batch.images)], 1, "batch")
    images = comm.bcast(None if batch is None else np.ascontiguousarray(batch.images),
                        (n, input_size, input_size, 3), np.uint8, "batch")
    aux = None
    if batch is not None:
        aux = np.concatenate([batch.offsets, batch.flips[:, None], batch.noise],
                             axis=1).astype(np.float32)
    aux = comm.bcast(aux, (n, 6), np.float32, "batch")
    if batch is not None:
        return batch
    return Batch(images=images, offsets=aux[:, :2].astype(np.int32), flips=aux[:, 2] > 0.5,
                 noise=np.ascontiguousarray(aux[:, 3:]), labels=np.zeros(n, np.int64))


def share_stats(comm: Comm, stats: DataStats | None, config: Config) -> DataStats:
    """The coordinator's dataset statistics (mean image, colour eigenvectors) on every rank."""
    s = config.data.image_size
    mean = comm.bcast(None if stats is None else np.ascontiguousarray(stats.mean_image,
                                                                      np.float32),
                      (s, s, 3), np.float32, "stats")
    eigval = comm.bcast(None if stats is None else np.ascontiguousarray(stats.eigval,
                                                                        np.float32),
                        (3,), np.float32, "stats")
    eigvec = comm.bcast(None if stats is None else np.ascontiguousarray(stats.eigvec,
                                                                        np.float32),
                        (3, 3), np.float32, "stats")
    return stats if stats is not None else DataStats(mean, eigval, eigvec)
