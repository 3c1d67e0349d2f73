"""Datasets: the in-memory/memory-mapped split, its statistics, the synthetic default, the cache.

A `Dataset` is one split of uint8 RGB images (N, S, S, 3), S = `data.image_size`, with int64
labels and class names. `DataStats` (mean image, RGB eigenvalues/eigenvectors) always come from
the training split. Three sources produce them (`dualgpu_alexnet.data.open_data` picks one):

- the embedded synthetic dataset (`synthetic_dataset`): oriented colour gratings and blobs whose
  class survives random crops, flips and colour noise; generated in memory, always the same;
- a cache written by `python -m launch.prepare` (`load_cache`), memory-mapped;
- a raw image folder decoded on the fly (`dualgpu_alexnet.data.load_image_folder`).

`make_digits_folder` writes scikit-learn's 1,797 real 8x8 digits as a small PNG image folder.
"""

from __future__ import annotations

import colorsys
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_VERSION = 1
META_FILE = "meta.json"  # written last: a cache without it is incomplete
SOURCE_FILE = "source.json"  # written first: which folder a (possibly incomplete) cache is from

# The standard ImageNet values quoted with the paper (pixels on [0, 1]); columns = eigenvectors.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], dtype=np.float32)

_SYNTHETIC_SEED = 20120927  # fixed: every run, whatever train.seed, sees the same synthetic data


@dataclass
class Dataset:
    """One split: uint8 RGB images (N, S, S, 3), int64 labels (N,), class names."""

    images: np.ndarray  # uint8 (N, S, S, 3), in memory or memory-mapped
    labels: np.ndarray  # int64 (N,) indices into `classes`
    classes: list[str]  # class names (sorted train folder names, wnids, or class_00...)
    input_size: int = 0  # side of the evaluation crops (open_data: model.input_size; 0 = derive)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        """Side S of the stored square images."""
        return int(self.images.shape[1])


@dataclass
class DataStats:
    """Statistics of the training split used by mean subtraction and fancy-PCA colour noise."""

    mean_image: np.ndarray  # float32 (S, S, 3), pixel values on 0..255
    eigval: np.ndarray  # float32 (3,) eigenvalues of the RGB covariance, pixels on [0, 1]
    eigvec: np.ndarray  # float32 (3, 3), columns = eigenvectors (rows R, G, B)


class StatsAccumulator:
    """Accumulates the mean image and RGB covariance over images added in any number of chunks."""

    def __init__(self, image_size: int):
        self.count = 0
        self.pixel_sum = np.zeros((image_size, image_size, 3), np.int64)  # exact sum of images
        self.scatter = np.zeros((3, 3), np.float64)  # sum over pixels of (x - 128)(x - 128)^T

    def add(self, images: np.ndarray, scatter: np.ndarray | None = None) -> None:
        """Add a uint8 chunk (n, S, S, 3); `scatter` = its `rgb_scatter` if already computed."""
        for start in range(0, len(images), 4096):  # exact: uint32 chunk sums into int64
            part = images[start:start + 4096]
            np.add(self.pixel_sum, part[0] if len(part) == 1 else part.sum(0, dtype=np.uint32),
                   out=self.pixel_sum)
        self.scatter += rgb_scatter(images) if scatter is None else scatter
        self.count += len(images)

    def result(self) -> DataStats:
        """Mean image, and eigen decomposition (descending) of the RGB covariance on [0, 1]."""
        if self.count == 0:
            raise ValueError("cannot compute data statistics of an empty training split")
        pixels = self.count * self.pixel_sum.shape[0] * self.pixel_sum.shape[1]
        shifted_mean = self.pixel_sum.sum(axis=(0, 1)) / pixels - _SHIFT  # (3,) on 0..255 - 128
        cov = (self.scatter / pixels - np.outer(shifted_mean, shifted_mean)) / 255.0**2
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.maximum(eigval[order], 0.0), eigvec[:, order]
        # Deterministic signs: the largest-magnitude component of each eigenvector is positive.
        signs = np.sign(eigvec[np.abs(eigvec).argmax(axis=0), np.arange(3)])
        eigvec = eigvec * np.where(signs == 0, 1.0, signs)
        mean_image = self.pixel_sum.astype(np.float64) / self.count  # (S, S, 3) on 0..255
        return DataStats(mean_image=mean_image.astype(np.float32),
                         eigval=eigval.astype(np.float32), eigvec=eigvec.astype(np.float32))


_SHIFT = 128.0  # pixels are centred near 128 before the products: less cancellation


def rgb_scatter(images: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Sum over all pixels of (x - 128)(x - 128)^T (3, 3), x = RGB on 0..255, of a uint8 chunk."""
    x = images.reshape(-1, 3)  # (n*S*S, 3) uint8
    planar = np.empty((3, min(block, len(x))), np.float32)
    total = np.zeros((3, 3), np.float64)
    for start in range(0, len(x), block):  # float32 dot products per block, float64 totals
        part = planar[:, :len(x) - start] if len(x) - start < block else planar
        np.subtract(x[start:start + block].T, np.float32(_SHIFT), out=part)
        for i in range(3):
            for j in range(i, 3):
                total[i, j] += np.dot(part[i], part[j])
    return np.triu(total) + np.triu(total, 1).T


def compute_stats(images: np.ndarray, chunk: int = 256) -> DataStats:
    """Statistics of a uint8 (N, S, S, 3) training split, accumulated in float64 chunk by chunk."""
    acc = StatsAccumulator(images.shape[1])
    for start in range(0, len(images), chunk):
        acc.add(np.asarray(images[start:start + chunk]))
    return acc.result()


# ----------------------------------------------------------------------------- synthetic data

def _class_params(num_classes: int) -> dict[str, np.ndarray]:
    """Per-class grating type/frequency, hue and blob row: distinct, flip- and crop-invariant."""
    c = np.arange(num_classes)
    return {
        "kind": c % 3,  # 0: vertical bars, 1: horizontal bars, 2: plaid (both): flip-invariant
        "cycles": np.where((c // 3) % 2 == 0, 5.0, 10.0),  # grating cycles across the image
        "hue": c / num_classes,  # grating colour around the colour wheel
        "blob_row": np.where((c // 2) % 2 == 0, 0.3, 0.7),  # blob in the top or the bottom half
    }


def _hsv(hues: np.ndarray, sat: float) -> np.ndarray:
    return np.array([colorsys.hsv_to_rgb(h % 1.0, sat, 1.0) for h in hues], np.float32)


def _synthetic_split(n: int, size: int, num_classes: int, rng: np.random.Generator,
                     chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Generate n labelled images (balanced classes, shuffled), vectorised chunk by chunk.

    Every term of an image is separable (a column profile times a row profile with colour), so a
    chunk is one batched matmul: (b, S, 6) @ (b, 6, S*3) -> (b, S, S*3), then noise and clipping.
    """
    p = _class_params(num_classes)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    grid = np.arange(size) / size  # (S,) coordinates on [0, 1)
    noise_bank = rng.integers(-40, 41, (2 * size, 2 * size * 3)).astype(np.float32)
    pixels = np.empty((chunk, size, size * 3), np.float32)  # reused: allocation is costly
    for start in range(0, n, chunk):
        y = labels[start:start + chunk]
        b = len(y)
        cols_y = np.empty((b, size, 6))  # column profiles (over rows y)
        rows_x = np.empty((b, 6, size, 3))  # row profiles (over columns x) times an RGB colour
        # Grating: cos(a x + b y + phase) = cos(b y + phase) cos(a x) - sin(b y + phase) sin(a x),
        # jittered per image in frequency (+-12%), orientation (+-8 deg), phase and hue.
        cycles = p["cycles"][y] * rng.uniform(0.88, 1.12, b)
        theta = np.deg2rad(rng.uniform(-8, 8, b)) + np.where(p["kind"][y] == 1, np.pi / 2, 0.0)
        hue = p["hue"][y] + rng.uniform(-0.3, 0.3, b) / num_classes
        grating_rgb = (_hsv(hue, 0.9) - 0.45) * rng.uniform(40, 100, (b, 1))  # (b, 3)
        for turn in (0, 1):  # the second, perpendicular grating only shows in plaids
            weight = np.where(p["kind"][y] == 2, 0.6, 1.0 - turn)[:, None]  # (b, 1)
            angle = theta + turn * np.pi / 2
            ax = (2 * np.pi * cycles * np.cos(angle))[:, None] * grid  # (b, S)
            by = (2 * np.pi * cycles * np.sin(angle))[:, None] * grid + rng.uniform(
                0, 2 * np.pi, (b, 1))
            cols_y[:, :, 2 * turn] = weight * np.cos(by)
            cols_y[:, :, 2 * turn + 1] = -weight * np.sin(by)
            rows_x[:, 2 * turn] = np.cos(ax)[:, :, None] * grating_rgb[:, None, :]
            rows_x[:, 2 * turn + 1] = np.sin(ax)[:, :, None] * grating_rgb[:, None, :]
        # Gaussian blob in the class's half (top/bottom) at a random column, complementary hue.
        blob_rgb = (_hsv(hue + 0.5, 0.8) - 0.4) * rng.uniform(60, 100, (b, 1))
        centre_y = p["blob_row"][y] + rng.uniform(-0.08, 0.08, b)
        centre_x = rng.uniform(0.2, 0.8, b)
        width = rng.uniform(0.08, 0.14, b)[:, None]
        cols_y[:, :, 4] = np.exp(-0.5 * ((grid - centre_y[:, None]) / width) ** 2)
        rows_x[:, 4] = np.exp(-0.5 * ((grid - centre_x[:, None]) / width) ** 2)[:, :, None] \
            * blob_rgb[:, None, :]
        # Random colour cast around grey: ones(y) x cast(x).
        cols_y[:, :, 5] = 1.0
        rows_x[:, 5] = (128 + rng.uniform(-25, 25, (b, 1, 3)))
        px = pixels[:b]
        np.matmul(cols_y.astype(np.float32), rows_x.reshape(b, 6, 3 * size).astype(np.float32),
                  out=px)  # (b, S, S*3)
        for i, (r, c) in enumerate(rng.integers(0, size, (b, 2))):  # windows of one noise field
            px[i] += noise_bank[r:r + size, 3 * c:3 * (c + size)]
        np.clip(px, 0, 255, out=px)
        np.copyto(images[start:start + b].reshape(b, size, 3 * size), px, casting="unsafe")
    return images, labels


@functools.lru_cache(maxsize=2)
def _synthetic_cached(n_train: int, n_val: int, size: int,
                      num_classes: int) -> tuple[Dataset, Dataset, DataStats]:
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    classes = [f"class_{c:02d}" for c in range(num_classes)]
    train = Dataset(*_synthetic_split(n_train, size, num_classes, rng), classes)
    val = Dataset(*_synthetic_split(n_val, size, num_classes, rng), classes)
    stats = compute_stats(train.images)
    for arr in (train.images, train.labels, val.images, val.labels, stats.mean_image,
                stats.eigval, stats.eigvec):
        arr.flags.writeable = False  # shared between calls: nobody may modify it
    return train, val, stats


def synthetic_dataset(n_train: int, n_val: int, image_size: int,
                      num_classes: int) -> tuple[Dataset, Dataset, DataStats]:
    """The embedded synthetic dataset: deterministic (fixed seed), generated in memory.

    Each class is a combination of grating type (vertical, horizontal, plaid), grating frequency,
    grating hue and blob half (top/bottom), all invariant to crops and horizontal flips; every
    image jitters orientation, frequency, phase, hue, blob position and colour cast, plus noise.

    Args:
        n_train: training images; n_val: validation images (classes balanced, shuffled).
        image_size: side S of the square images.
        num_classes: number of classes, named class_00, class_01, ...
    Returns:
        (train, val, stats) with read-only arrays (cached: repeated calls return the same data).
    """
    if n_train < 1 or n_val < 1 or num_classes < 2 or image_size < 8:
        raise ValueError(f"synthetic dataset needs n_train, n_val >= 1, num_classes >= 2 and "
                         f"image_size >= 8; got {n_train}, {n_val}, {num_classes}, {image_size}")
    train, val, stats = _synthetic_cached(n_train, n_val, image_size, num_classes)
    # Fresh wrappers around the shared read-only arrays: callers may set attributes freely.
    return (Dataset(train.images, train.labels, list(train.classes)),
            Dataset(val.images, val.labels, list(val.classes)),
            DataStats(stats.mean_image, stats.eigval, stats.eigvec))


# ----------------------------------------------------------------------------- prepared cache

def is_cache(path: Path) -> bool:
    """Whether `path` looks like a cache written by `launch.prepare` (complete or not)."""
    return any((path / name).exists() for name in (META_FILE, SOURCE_FILE, "train_images.npy"))


def read_meta(path: Path) -> dict:
    """The cache's meta.json, or a ValueError saying the cache is incomplete."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path}: incomplete cache (no {META_FILE}; `python -m launch.prepare` "
                         "was interrupted?): run it again with the same source and --out")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: unreadable cache metadata: {e}") from None
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{meta_path}: cache version {meta.get('version')!r}, this code reads "
                         f"version {CACHE_VERSION}: prepare the cache again")
    return meta


def load_cache(path: str | Path, image_size: int) -> tuple[Dataset, Dataset, DataStats]:
    """Open a prepared cache: images memory-mapped read-only, labels and stats in memory.

    Args:
        path: the cache folder (`--out` of `python -m launch.prepare`).
        image_size: the S the config expects; a cache made with another S is refused.
    Returns:
        (train, val, stats).
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("image_size") != image_size:
        raise ValueError(f"{path}: cache was prepared with image_size={meta.get('image_size')}, "
                         f"the config asks for data.image_size={image_size}: prepare again with "
                         f"--image-size {image_size} or set data.image_size")
    try:
        classes = json.loads((path / "classes.json").read_text())
        splits = []
        for split in ("train", "val"):
            images = np.load(path / f"{split}_images.npy", mmap_mode="r")
            labels = np.load(path / f"{split}_labels.npy").astype(np.int64)
            if images.shape != (meta["counts"][split], image_size, image_size, 3) or \
                    images.dtype != np.uint8 or len(labels) != len(images):
                raise ValueError(f"{path}: {split}_images.npy has shape {images.shape} "
                                 f"{images.dtype} and {len(labels)} labels; meta.json says "
                                 f"{meta['counts'][split]} images of {image_size}: corrupt cache")
            splits.append(Dataset(images, labels, list(classes)))
        with np.load(path / "stats.npz") as z:
            stats = DataStats(z["mean_image"].astype(np.float32), z["eigval"].astype(np.float32),
                              z["eigvec"].astype(np.float32))
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: broken cache ({e}): prepare it again") from None
    return splits[0], splits[1], stats


# ----------------------------------------------------------------------------- digits folder

def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits: (images float (1797, 8, 8) on 0..16, targets (1797,)).

    Reads the CSV that scikit-learn ships (sklearn/datasets/data/digits.csv.gz) directly, which
    skips importing scikit-learn (seconds); falls back to `sklearn.datasets.load_digits`.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ValueError("scikit-learn is not installed: `pip install scikit-learn`")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")  # (1797, 65): 64 pixels, then the digit
        return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def make_digits_folder(out: str | Path, size: int = 112, val_fraction: float = 0.2) -> dict:
    """Write scikit-learn's 1,797 real 8x8 handwritten digits as a PNG image folder.

    Layout OUT/{train,val}/digit_<d>/<index>.png, grey-level PNGs upscaled to size x size with
    Pillow (bicubic). Per class, a fixed permutation puts floor(n * val_fraction) images in val.

    Args:
        out: destination folder (created; must be missing or empty).
        size: side of the written images.
        val_fraction: share of each class held out for validation.
    Returns:
        {"train": {class: count}, "val": {class: count}}.
    """
    from PIL import Image

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose a new folder")
    if size < 8 or not 0 < val_fraction < 1:
        raise ValueError(f"size must be >= 8 and 0 < val_fraction < 1; got {size}, {val_fraction}")
    images, targets = load_digits_arrays()
    pixels = np.rint(images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..255
    rng = np.random.default_rng(8)
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(targets == digit))
        n_val = int(len(members) * val_fraction)
        name = f"digit_{digit}"
        for split, chosen in (("val", members[:n_val]), ("train", members[n_val:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in sorted(chosen):
                image = Image.fromarray(pixels[index]).resize((size, size),
                                                              Image.Resampling.BICUBIC)
                image.save(folder / f"{index:04d}.png", compress_level=1)
            counts[split][name] = len(chosen)
    return counts
