"""Batches: deterministic data order, the paper's augmentation, evaluation crops, network input.

The coordinator builds a small uint8 `Batch` (crops already taken and flipped, plus each image's
crop offset, flip and colour-noise offset); every rank turns it into the float network input with
`to_input`, which is cheap and gives bit-identical results wherever it runs.

- Order: epoch e visits the images in a permutation seeded by (train.seed, e); step t takes the
  positions [t*B, (t+1)*B) of the concatenated epochs (so a batch may straddle two epochs).
- Augmentation, seeded by (train.seed, t): a random input_size crop (else the centre crop),
  a horizontal flip with probability 1/2, and fancy-PCA colour noise
  `eigvec @ (alpha * eigval) * 255` with alpha ~ N(0, data.color_noise) per image.
- Evaluation: the centre crop, or the paper's 10 views (see `ten_crop_offsets`).
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from dualgpu_alexnet.config import Config
from dualgpu_alexnet.datasets import Dataset, DataStats

_ORDER, _AUGMENT = 0x0DE5, 0xA06  # stream tags: the order and augmentation streams never collide


@dataclass
class Batch:
    """What the coordinator sends to the devices: uint8 crops and how they were made."""

    images: np.ndarray  # uint8 (N, I, I, 3) crops already taken and flipped, I = model.input_size
    offsets: np.ndarray  # int32 (N, 2) crop (row, col) in the S x S stored image
    flips: np.ndarray  # bool (N,) whether the crop was flipped left-right
    noise: np.ndarray  # float32 (N, 3) fancy-PCA RGB offset on the 0..255 scale
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of range(n) that epoch `epoch` visits (read-only, cached)."""
    order = np.random.default_rng([seed, epoch, _ORDER]).permutation(n)
    order.flags.writeable = False
    return order


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Dataset indices of training step `step`: positions [step*B, (step+1)*B) of the epochs."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, within = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = epoch_order(seed, int(epoch), n)[within[mask]]
    return out


def gather_crops(images: np.ndarray, index: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                 size: int) -> np.ndarray:
    """Crops images[index[k]][r:r+size, c:c+size], flipped left-right where flips[k]."""
    out = np.empty((len(index), size, size, 3), np.uint8)  # (N, I, I, 3)
    for k, (i, (r, c), flip) in enumerate(zip(index, offsets, flips, strict=True)):
        crop = images[i, r:r + size, c:c + size]
        if flip:  # one channel at a time: 4x faster than a reversed copy of 3-byte pixels
            for ch in range(3):
                out[k, :, :, ch] = crop[:, ::-1, ch]
        else:
            out[k] = crop
    return out


def pca_noise(alpha: np.ndarray, stats: DataStats) -> np.ndarray:
    """Fancy-PCA offsets (N, 3) on 0..255: eigvec @ (alpha[n] * eigval) * 255 for each n."""
    return ((alpha * stats.eigval) @ stats.eigvec.T * 255.0).astype(np.float32)


def train_batch(ds: Dataset, stats: DataStats, step: int, cfg: Config) -> Batch:
    """The augmented training batch of `step`; a pure function of (train.seed, step) and the data.

    Args:
        ds: the training split; stats: its statistics (eigval/eigvec for the colour noise).
        step: global step (0-based); cfg: data.random_crop/flip/color_noise, model.input_size,
            train.seed, train.batch_size.
    Returns:
        The Batch of train.batch_size images.
    """
    size, stored = cfg.model.input_size, ds.images.shape[1]
    if stored < size:
        raise ValueError(f"stored images are {stored}x{stored}, smaller than "
                         f"model.input_size={size}")
    batch_size, seed = cfg.train.batch_size, cfg.train.seed
    index = batch_indices(len(ds), batch_size, step, seed)
    rng = np.random.default_rng([seed, step, _AUGMENT])
    # Always draw all three, so switching one augmentation off leaves the others unchanged.
    offsets = rng.integers(0, stored - size + 1, (batch_size, 2)).astype(np.int32)
    flips = rng.random(batch_size) < 0.5
    alpha = rng.standard_normal((batch_size, 3)) * cfg.data.color_noise
    if not cfg.data.random_crop:
        offsets[:] = (stored - size) // 2
    if not cfg.data.flip:
        flips[:] = False
    noise = pca_noise(alpha, stats) if cfg.data.color_noise > 0 else np.zeros((batch_size, 3),
                                                                              np.float32)
    return Batch(gather_crops(ds.images, index, offsets, flips, size), offsets, flips, noise,
                 ds.labels[index].astype(np.int64))


def ten_crop_offsets(stored: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's 10 views: (offsets (10, 2), flips (10,)).

    Views 0-4: top-left, top-right, bottom-left, bottom-right, centre; views 5-9: the same crops
    flipped left-right.
    """
    far, mid = stored - size, (stored - size) // 2
    corners = np.array([[0, 0], [0, far], [far, 0], [far, far], [mid, mid]], np.int32)
    return np.concatenate([corners, corners]), np.repeat([False, True], 5)


def default_input_size(stored: int) -> int:
    """The paper's crop for S: the largest I <= S * 227 / 256 with (I - 11) % 4 == 0."""
    size = int(stored * 227 / 256)
    return max(size - (size - 11) % 4, 1)


def eval_batches(ds: Dataset, batch_size: int, crops: str = "center", limit: int = 0,
                 input_size: int = 0) -> Iterator[Batch]:
    """Validation batches in dataset order, without augmentation noise.

    Args:
        ds: the split; batch_size: at most this many rows (views) per Batch.
        crops: "center" (one centre crop per image) or "ten" (10 views per image, image-major:
            row n*10 + v is view v of the batch's image n, views as in `ten_crop_offsets`; a
            Batch holds max(1, batch_size // 10) images and labels are repeated per view).
        limit: stop after this many batches (0 = all).
        input_size: crop side (0 = ds.input_size, which open_data sets to model.input_size,
            else `default_input_size(S)`: 227 for S = 256, 99 for S = 112).
    Returns:
        An iterator of Batches; average the softmax of a "ten" batch with `average_views`.
    """
    if crops not in ("center", "ten"):
        raise ValueError(f"crops must be 'center' or 'ten', got {crops!r}")
    if batch_size < 1 or limit < 0:
        raise ValueError(f"batch_size must be >= 1 and limit >= 0; got {batch_size}, {limit}")
    stored = ds.images.shape[1]
    size = input_size or ds.input_size or default_input_size(stored)
    if size > stored:
        raise ValueError(f"input_size {size} is larger than the stored images ({stored})")
    if crops == "ten":
        view_offsets, view_flips = ten_crop_offsets(stored, size)
    else:
        view_offsets = np.full((1, 2), (stored - size) // 2, np.int32)
        view_flips = np.zeros(1, bool)
    views = len(view_flips)
    per_batch = max(1, batch_size // views)
    for number, start in enumerate(range(0, len(ds), per_batch)):
        if limit and number >= limit:
            return
        index = np.repeat(np.arange(start, min(start + per_batch, len(ds))), views)  # image-major
        n = len(index) // views
        offsets, flips = np.tile(view_offsets, (n, 1)), np.tile(view_flips, n)
        yield Batch(gather_crops(ds.images, index, offsets, flips, size), offsets, flips,
                    np.zeros((len(index), 3), np.float32), ds.labels[index].astype(np.int64))


def average_views(probs: np.ndarray, n_views: int = 10) -> np.ndarray:
    """Average (n*n_views, K) image-major per-view probabilities into (n, K) per image."""
    if probs.shape[0] % n_views:
        raise ValueError(f"{probs.shape[0]} rows are not a multiple of n_views={n_views}")
    return probs.reshape(-1, n_views, probs.shape[-1]).mean(axis=1)


def to_input(batch: Batch, stats: DataStats, cfg: Config, dtype: np.dtype | type = np.float32
             ) -> np.ndarray:
    """The network input (N, I, I, 3) NHWC: pixels - mean crop (if data.mean_subtract) + noise.

    The mean image is cropped at each row's offset and flipped like it, so the subtraction is
    the same as subtracting the mean before cropping. Per image: (x - mean window) + noise, in
    `dtype`, with contiguous inner loops; deterministic, so every rank gets the same bits.

    Args:
        batch: uint8 crops with their offsets, flips and noise; stats: mean_image (S, S, 3).
        cfg: data.mean_subtract; dtype: float32 or float64.
    Returns:
        A new C-contiguous array of `dtype`.
    """
    n, size = batch.images.shape[0], batch.images.shape[1]
    pixels = batch.images.reshape(n, size, size * 3)  # (N, I, I*3): contiguous inner loops
    if not cfg.data.mean_subtract:
        x = batch.images.astype(dtype)  # (N, I, I, 3)
    else:
        x = np.empty((n, size, size, 3), dtype)
        mean = stats.mean_image.astype(dtype, copy=False)  # (S, S, 3)
        stored = mean.shape[1]
        mean_flipped = np.ascontiguousarray(mean[:, ::-1])  # a flipped crop = a window of it
        for k, ((r, c), flip) in enumerate(zip(batch.offsets, batch.flips, strict=True)):
            if flip:
                window = mean_flipped[r:r + size, stored - size - c:stored - c]
            else:
                window = mean[r:r + size, c:c + size]
            np.subtract(pixels[k], window.reshape(size, size * 3),
                        out=x[k].reshape(size, size * 3))
    rows = x.reshape(n, size, size * 3)
    noise = batch.noise.astype(dtype)
    for k in range(n):
        rows[k] += np.tile(noise[k], size)  # (I*3,): the pixel offset along a row, every row
    return x


class Prefetcher:
    """Makes batches for steps start_step, start_step+1, ... in a background thread.

    Args:
        make: step -> Batch (e.g. `lambda s: train_batch(ds, stats, s, cfg)`).
        start_step: the first step that `get` will ask for.
        depth: batches made ahead (0 = synchronous: `get` calls `make` itself).
    """

    def __init__(self, make: Callable[[int], Batch], start_step: int, depth: int):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._make, self._next = make, start_step
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, args=(start_step,),
                                            name="prefetch", daemon=True)
            self._thread.start()

    def _work(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item: tuple[int, Batch | None, BaseException | None] = (step, self._make(step),
                                                                       None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int) -> tuple[Batch, float]:
        """The batch of `step` (steps must be asked for in order) and the seconds waited for it."""
        if step != self._next:
            raise ValueError(f"Prefetcher expected step {self._next}, was asked for {step}")
        if self._stop.is_set():
            raise RuntimeError("Prefetcher is closed")
        start = time.perf_counter()
        if self._thread is None:
            batch = self._make(step)
        else:
            made, batch, error = self._queue.get()
            if error is not None:
                self.close()
                raise error
            assert made == step, (made, step)
        self._next += 1
        return batch, time.perf_counter() - start

    def close(self) -> None:
        """Stop the worker thread (a batch being made is finished and dropped)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
