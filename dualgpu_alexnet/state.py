"""Moving whole-model state between the ranks' shards and one checkpoint file.

A checkpoint always holds the whole model in the conventional layout (SPEC section 7), whatever the
number of ranks that wrote it. Saving gathers every shard at the coordinator; loading reads the
file at the coordinator and scatters each rank its rows, so a 2-rank checkpoint resumes on one
process and the reverse, and only the coordinator needs to see the file system.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .comm import Comm
from .config import ModelConfig
from .partition import DEVICE0, plan


def _tensor_names(model: ModelConfig) -> list[tuple[str, object]]:
    return [(f"{p.name}.{kind}", p) for p in plan(model) for kind in ("weight", "bias")]


def gather_whole(shards: Mapping[str, np.ndarray], model: ModelConfig, comm: Comm,
                 prefix: str = "") -> dict[str, np.ndarray] | None:
    """Whole tensors at the coordinator from every rank's row shards (None on other ranks).

    Args:
        shards: this rank's arrays under conventional names (parameters or momentum).
        model: the model config (which layers are split, which live on device 0).
        comm: the model communicator.
        prefix: prefix added to the names of the result (e.g. "momentum.").
    """
    whole: dict[str, np.ndarray] = {}
    for name, p in _tensor_names(model):
        if p.owner == DEVICE0 or comm.size == 1:
            if comm.is_coordinator:
                whole[prefix + name] = np.array(shards[name])
            continue
        parts = comm.gather(np.ascontiguousarray(shards[name]), f"state:{name}", "ctl")
        if parts is not None:
            whole[prefix + name] = parts.reshape(-1, *parts.shape[2:]).copy()
    return whole if comm.is_coordinator else None


def scatter_whole(whole: Mapping[str, np.ndarray] | None, model: ModelConfig, comm: Comm,
                  prefix: str = "") -> dict[str, np.ndarray]:
    """Each rank's row shards of whole tensors held by the coordinator (None elsewhere).

    Returns:
        conventional name -> this rank's shard in model.dtype; layers it holds none of are absent.
    """
    dtype = np.dtype(model.dtype)
    shards: dict[str, np.ndarray] = {}
    for name, p in _tensor_names(model):
        shard_shape = (p.c_out // comm.size, *p.weight_shape[1:]) if name.endswith(".weight") \
            else (p.c_out // comm.size,)
        if p.owner == DEVICE0 or comm.size == 1:
            if comm.is_coordinator:
                shards[name] = np.ascontiguousarray(whole[prefix + name], dtype=dtype)
            continue
        parts = None
        if comm.is_coordinator:
            full = np.ascontiguousarray(whole[prefix + name], dtype=dtype)
            parts = full.reshape(comm.size, *shard_shape)
        shards[name] = comm.scatter(parts, shard_shape, dtype, f"state:{name}", "ctl").copy()
    return shards
