"""The data pipeline's front door: `open_data` picks the source; the rest is re-exported.

- `open_data(None, cfg)`: the embedded synthetic dataset (`datasets.synthetic_dataset`).
- `open_data(CACHE, cfg)`: a cache written by `python -m launch.prepare SRC --out CACHE`,
  memory-mapped (`datasets.load_cache`).
- `open_data(DIR, cfg)`: a raw folder DIR/train/<class>/*, DIR/val/<class>/* (or the flat
  ILSVRC-2012 val layout, see `prepare`), decoded now into memory (slow for big sets: prepare a
  cache once instead).

Batches, augmentation, evaluation crops, `to_input` and the `Prefetcher` live in `augment`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from dualgpu_alexnet.augment import (
    Batch,
    Prefetcher,
    average_views,
    batch_indices,
    default_input_size,
    epoch_order,
    eval_batches,
    gather_crops,
    pca_noise,
    ten_crop_offsets,
    to_input,
    train_batch,
)
from dualgpu_alexnet.config import Config
from dualgpu_alexnet.datasets import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    Dataset,
    DataStats,
    StatsAccumulator,
    compute_stats,
    is_cache,
    load_cache,
    make_digits_folder,
    synthetic_dataset,
)
from dualgpu_alexnet.prepare import decode_split, scan_folder

__all__ = [
    "Batch", "Dataset", "DataStats", "IMAGENET_EIGVAL", "IMAGENET_EIGVEC", "Prefetcher",
    "StatsAccumulator", "average_views", "batch_indices", "compute_stats", "default_input_size",
    "epoch_order", "eval_batches", "gather_crops", "load_cache", "load_image_folder",
    "make_digits_folder", "open_data", "pca_noise", "synthetic_dataset", "ten_crop_offsets",
    "to_input", "train_batch",
]

log = logging.getLogger(__name__)


def load_image_folder(root: str | Path, image_size: int, workers: int = 0,
                      progress: bool = False) -> tuple[Dataset, Dataset, DataStats]:
    """Decode a raw image folder into memory (unreadable files are skipped with a warning).

    Args:
        root: DIR with train/<class>/* and val/ (class folders or the flat ILSVRC layout).
        image_size: side S of the stored images; workers: decode threads (0 = one per core).
        progress: draw progress bars on stderr.
    Returns:
        (train, val, stats), all in memory.
    """
    layout = scan_folder(root)
    stats = StatsAccumulator(image_size)
    splits, skipped = [], []
    for name, split in (("train", layout.train), ("val", layout.val)):
        images = np.empty((len(split.paths), image_size, image_size, 3), np.uint8)
        labels, bad = decode_split(split, image_size, images, workers, strict=False,
                                   stats=stats if name == "train" else None, processes=False,
                                   label=name, progress=progress)
        if len(labels) == 0:
            raise ValueError(f"{Path(root) / name}: no readable images ({len(bad)} skipped)")
        splits.append(Dataset(images[:len(labels)].copy() if bad else images, labels,
                              list(layout.classes)))
        skipped += bad
    for item in skipped[:10]:
        log.warning("skipped unreadable file %s (%s)", item["path"], item["reason"])
    if len(skipped) > 10:
        log.warning("skipped %d unreadable files in all", len(skipped))
    return splits[0], splits[1], stats.result()


def open_data(data_path: str | None, cfg: Config) -> tuple[Dataset, Dataset, DataStats]:
    """Open the training and validation splits and the training statistics.

    Args:
        data_path: None (the embedded synthetic dataset), a cache folder from `launch.prepare`,
            or a raw image folder (see the module docstring).
        cfg: data.image_size, data.synthetic_*, data.workers, model.input_size/num_classes.
    Returns:
        (train, val, stats). A ValueError names the path and the problem for bad input.
    """
    d = cfg.data
    if data_path is None:
        train, val, stats = synthetic_dataset(d.synthetic_train, d.synthetic_val, d.image_size,
                                              d.synthetic_classes)
    else:
        path = Path(data_path)
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        if not path.is_dir():
            raise ValueError(f"{path}: not a folder (expected a cache from launch.prepare or "
                             "an image folder with train/ and val/)")
        if is_cache(path):
            train, val, stats = load_cache(path, d.image_size)
        else:
            start = time.monotonic()
            train, val, stats = load_image_folder(path, d.image_size, d.workers)
            log.warning("decoded %d + %d images of %s in %.0f s; run `python -m launch.prepare "
                        "%s --out CACHE --image-size %d` once and pass --data CACHE to skip this",
                        len(train), len(val), path, time.monotonic() - start, path, d.image_size)
    if d.image_size < cfg.model.input_size:
        raise ValueError(f"data.image_size={d.image_size} is smaller than "
                         f"model.input_size={cfg.model.input_size}")
    train.input_size = val.input_size = cfg.model.input_size
    return train, val, stats
