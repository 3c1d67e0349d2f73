"""Whole-model initialisation from a seed, then sliced per rank.

Every rank draws the same full tensors (layer by layer, each from its own seeded stream) and keeps
its rows, so a sharded model equals the unsharded one by construction.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .partition import LayerPlan, plan

# Layers whose bias starts at model.bias_init (the paper: 1); the others start at 0.
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def init_layer(p: LayerPlan, index: int, model: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Full-size weight and bias of one layer, in the conventional layout and model.dtype."""
    dtype = np.dtype(model.dtype)
    rng = np.random.default_rng([seed, index])
    std = model.init_std_fc67 if p.name in ("fc6", "fc7") else model.init_std
    weight = rng.standard_normal(p.weight_shape, dtype=np.float32).astype(dtype, copy=False)
    weight *= dtype.type(std)
    bias_value = model.bias_init if p.name in BIAS_ONE_LAYERS else 0.0
    bias = np.full(p.c_out, bias_value, dtype)
    return {f"{p.name}.weight": weight, f"{p.name}.bias": bias}


def init_full(model: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The whole model's parameters: weights N(0, std^2), biases per BIAS_ONE_LAYERS."""
    tensors: dict[str, np.ndarray] = {}
    for index, p in enumerate(plan(model)):
        tensors.update(init_layer(p, index, model, seed))
    return tensors


def shard(full: dict[str, np.ndarray], model: ModelConfig, rank: int,
          world_size: int) -> dict[str, np.ndarray]:
    """This rank's rows of every whole-model tensor (C-contiguous copies in model.dtype).

    Args:
        full: conventional names -> whole-model arrays (from init_full or a checkpoint).
        rank, world_size: this rank and the number of ranks the model is split over.
    Returns:
        name -> shard; a layer the rank holds no rows of (fc8 kept on device 0) is absent.
    """
    dtype = np.dtype(model.dtype)
    shards = {}
    for p in plan(model):
        rows = p.out_slice(rank, world_size)
        if rows.stop == rows.start:
            continue
        for kind in ("weight", "bias"):
            name = f"{p.name}.{kind}"
            shards[name] = np.ascontiguousarray(full[name][rows], dtype=dtype)
    return shards


def init_shard(model: ModelConfig, seed: int, rank: int, world_size: int) -> dict[str, np.ndarray]:
    """This rank's parameters, drawing one full layer at a time (bounded memory)."""
    shards: dict[str, np.ndarray] = {}
    for index, p in enumerate(plan(model)):
        layer = init_layer(p, index, model, seed)
        rows = p.out_slice(rank, world_size)
        if rows.stop > rows.start:
            shards.update({k: np.ascontiguousarray(v[rows]) for k, v in layer.items()})
    return shards
