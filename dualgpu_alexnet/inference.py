"""Loading a checkpoint for inference, on one process or split over the ranks, and predicting.

A checkpoint of ours carries its config, the training set's mean image and colour statistics and
the class names. A file converted from Caffe or PyTorch carries only `<layer>.weight/.bias`: then
the preset given on the command line describes the model, the mean image is ImageNet's per-channel
mean, and classes are numbered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import config as config_mod
from .comm import Comm
from .config import Config
from .data import Batch, DataStats, to_input
from .datasets import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from .layers import softmax
from .model import Net
from .partition import check_world_size, full_shapes
from .prepare import decode_image
from .sharing import bcast_ints, share_batch, share_stats
from .state import scatter_whole

IMAGENET_RGB_MEAN = np.array([123.68, 116.78, 103.94], np.float32)  # 0..255, Caffe/PyTorch


@dataclass
class Loaded:
    """A model ready for inference on this rank."""

    config: Config
    net: Net
    stats: DataStats  # the training set's, or ImageNet's per-channel mean for converted files
    classes: list[str]


def load_for_inference(path: str, comm: Comm, preset: str = "alexnet2012",
                       overrides: list[str] | tuple[str, ...] = ()) -> Loaded:
    """Read a checkpoint at the coordinator, scatter each rank its rows, build the net.

    Args:
        path: a checkpoint in the conventional layout (ours or converted).
        preset, overrides: the model description for files that carry no config.
    """
    def work() -> tuple[dict, dict, str]:
        tensors, meta = ckpt.load_checkpoint(path, require_checksum=False)
        config = (config_mod.from_toml_text(meta["config"]) if "config" in meta
                  else config_mod.load(preset))
        config = config_mod.apply_overrides(config, overrides)
        ckpt.check_shapes(tensors, full_shapes(config.model), path)
        return tensors, meta, config.to_toml()

    tensors, meta, text = comm.on_coordinator(work) or ({}, {}, "")
    config = config_mod.from_toml_text(comm.bcast_text(text, "config"))
    check_world_size(config, comm.size)
    net = Net(config, comm, scatter_whole(tensors, config.model, comm))
    s = config.data.image_size
    if comm.is_coordinator and "data.mean_image" in tensors:
        stats = DataStats(tensors["data.mean_image"].astype(np.float32),
                          tensors["data.eigval"].astype(np.float32),
                          tensors["data.eigvec"].astype(np.float32))
    else:
        stats = DataStats(np.broadcast_to(IMAGENET_RGB_MEAN, (s, s, 3)).copy(),
                          np.asarray(IMAGENET_EIGVAL, np.float32),
                          np.asarray(IMAGENET_EIGVEC, np.float32))
    stats = share_stats(comm, stats if comm.is_coordinator else None, config)
    classes = list(meta.get("classes") or [str(i) for i in range(config.model.num_classes)])
    return Loaded(config, net, stats, classes)


def centre_batch(images: np.ndarray, input_size: int) -> Batch:
    """The evaluation view of stored (N, S, S, 3) uint8 images: the centre crop."""
    n, s = images.shape[0], images.shape[1]
    r = (s - input_size) // 2
    crops = np.ascontiguousarray(images[:, r:r + input_size, r:r + input_size])
    return Batch(crops, np.full((n, 2), r, np.int32), np.zeros(n, bool),
                 np.zeros((n, 3), np.float32), np.zeros(n, np.int64))


def logits_of_arrays(model: Loaded, comm: Comm, x_nchw: np.ndarray | None,
                     batch: int = 32) -> np.ndarray | None:
    """Logits (N, classes) of a preprocessed float32 NCHW batch (given at the coordinator)."""
    size = model.config.model.input_size
    error = None
    if comm.is_coordinator and (x_nchw.ndim != 4 or x_nchw.shape[1:] != (3, size, size)):
        error = (f"input must be float32 (N, 3, {size}, {size}) NCHW for preset "
                 f"{model.config.model.name!r}; got {x_nchw.shape} {x_nchw.dtype}")
    comm.agree(error)
    (n,) = bcast_ints(comm, [len(x_nchw)] if comm.is_coordinator else None, 1, "input")
    dtype = np.dtype(model.config.model.dtype)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        chunk = None
        if comm.is_coordinator:
            chunk = np.ascontiguousarray(x_nchw[start:start + m].transpose(0, 2, 3, 1), dtype)
        chunk = comm.bcast(chunk, (m, size, size, 3), dtype, "input")  # (m, I, I, 3) NHWC
        logits = model.net.forward(chunk, train=False)
        if comm.is_coordinator:
            out.append(np.array(logits))
    return np.concatenate(out) if comm.is_coordinator else None


def _decode(path: str, size: int) -> np.ndarray:
    try:
        return decode_image(Path(path), size)
    except Exception as e:  # Pillow raises many kinds: name the file whatever it was
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def probabilities_of_files(model: Loaded, comm: Comm, paths: list[str],
                           batch: int = 16) -> Iterator[tuple[str, np.ndarray]]:
    """(path, class probabilities) per image file, with the evaluation preprocessing."""
    cfg = model.config
    for start in range(0, len(paths), batch):
        names = paths[start:start + batch]
        shared = comm.on_coordinator(lambda names=names: centre_batch(
            np.stack([_decode(p, cfg.data.image_size) for p in names]), cfg.model.input_size))
        shared = share_batch(comm, shared, cfg.model.input_size)
        x = to_input(shared, model.stats, cfg, dtype=np.dtype(cfg.model.dtype))
        logits = model.net.forward(x, train=False)
        if comm.is_coordinator:
            probs = softmax(logits.astype(np.float64))
            yield from zip(names, probs, strict=True)
