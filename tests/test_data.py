"""Data order, augmentation, evaluation crops, network input, prefetching, the synthetic set."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from dualgpu_alexnet.config import Config, apply_overrides, load
from dualgpu_alexnet.data import (
    Batch,
    Dataset,
    DataStats,
    Prefetcher,
    average_views,
    batch_indices,
    compute_stats,
    default_input_size,
    eval_batches,
    open_data,
    synthetic_dataset,
    ten_crop_offsets,
    to_input,
    train_batch,
)
from dualgpu_alexnet.datasets import _synthetic_cached

S, CROP = 20, 15  # small stored images and crops for exact checks


def small_cfg(seed: int = 3, **data: object) -> Config:
    """tiny with S=20, CROP=15, batch 8 (input_size bypasses the net's geometry check)."""
    base = load("tiny", [f"train.seed={seed}", "train.batch_size=8"])
    return dataclasses.replace(base, model=dataclasses.replace(base.model, input_size=CROP),
                               data=dataclasses.replace(base.data, image_size=S, **data))


def small_dataset(n: int = 37, classes: int = 4) -> tuple[Dataset, DataStats]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    ds = Dataset(images, np.arange(n, dtype=np.int64) % classes, [f"c{i}" for i in range(classes)])
    return ds, compute_stats(images)


# ----------------------------------------------------------------------------- order


def test_same_seed_and_step_give_the_same_batch() -> None:
    ds, stats = small_dataset()
    cfg = small_cfg()
    a, b = train_batch(ds, stats, 5, cfg), train_batch(ds, stats, 5, cfg)
    for field in ("images", "offsets", "flips", "noise", "labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = train_batch(ds, stats, 6, cfg)
    assert not np.array_equal(a.images, c.images)
    d = train_batch(ds, stats, 5, small_cfg(seed=4))
    assert not np.array_equal(a.images, d.images)


def test_every_image_exactly_once_per_epoch_and_batches_wrap_across_epochs() -> None:
    n, batch = 37, 8
    ds = Dataset(np.zeros((n, S, S, 3), np.uint8), np.arange(n, dtype=np.int64), ["x"])
    _, stats = small_dataset()
    cfg = small_cfg()
    seen = np.concatenate([train_batch(ds, stats, step, cfg).labels for step in range(3 * n)])
    epochs = seen[:(3 * n * batch) // n * n].reshape(-1, n)  # labels = image indices here
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch has its own permutation
    # step 4 covers positions 32..39: the last 5 of epoch 0 and the first 3 of epoch 1
    np.testing.assert_array_equal(train_batch(ds, stats, 4, cfg).labels,
                                  np.concatenate([epochs[0][32:], epochs[1][:3]]))


def test_train_crops_and_flips_match_manual_slicing() -> None:
    ds, stats = small_dataset()
    batch = train_batch(ds, stats, 2, small_cfg())
    index = batch_indices(len(ds), 8, 2, seed=3)
    np.testing.assert_array_equal(batch.labels, ds.labels[index])
    for k, i in enumerate(index):
        r, c = batch.offsets[k]
        assert 0 <= r <= S - CROP and 0 <= c <= S - CROP
        crop = ds.images[i, r:r + CROP, c:c + CROP]
        np.testing.assert_array_equal(batch.images[k], crop[:, ::-1] if batch.flips[k] else crop)
    assert batch.flips.any() and not batch.flips.all()
    assert len(np.unique(batch.offsets, axis=0)) > 1


def test_no_random_crop_and_no_flip_give_centre_crops() -> None:
    ds, stats = small_dataset()
    batch = train_batch(ds, stats, 0, small_cfg(random_crop=False, flip=False, color_noise=0.0))
    assert (batch.offsets == (S - CROP) // 2).all() and not batch.flips.any()
    assert not batch.noise.any()
    m = (S - CROP) // 2
    crops = ds.images[:, m:m + CROP, m:m + CROP]
    for k in range(len(batch)):
        assert any(np.array_equal(batch.images[k], crop) for crop in crops)


def test_colour_noise_is_eigvec_times_alpha_eigval_with_alpha_std_0_1() -> None:
    ds, _ = small_dataset()
    eigvec = np.linalg.qr(np.random.default_rng(5).standard_normal((3, 3)))[0].astype(np.float32)
    stats = DataStats(np.zeros((S, S, 3), np.float32), np.array([0.2, 0.02, 0.005], np.float32),
                      eigvec)
    cfg = small_cfg()
    noise = np.concatenate([train_batch(ds, stats, s, cfg).noise for s in range(500)])  # (4000, 3)
    alpha = np.linalg.solve(eigvec, noise.T / 255.0).T / stats.eigval  # invert the formula
    np.testing.assert_allclose(alpha.std(axis=0), 0.1, rtol=0.06)
    np.testing.assert_allclose(alpha.mean(axis=0), 0.0, atol=0.01)
    # noise[n] = eigvec @ (alpha[n] * eigval) * 255, per image (the same offset on every pixel)
    np.testing.assert_allclose(noise[7], eigvec @ (alpha[7] * stats.eigval) * 255, rtol=1e-5)


# ----------------------------------------------------------------------------- evaluation


def test_ten_crops_are_corners_centre_and_their_flips_image_major() -> None:
    ds, _ = small_dataset(n=3)
    batches = list(eval_batches(ds, 20, crops="ten", input_size=CROP))  # 2 images per batch
    assert [len(b) for b in batches] == [20, 10]
    rows = np.concatenate([b.images for b in batches])
    far, mid = S - CROP, (S - CROP) // 2
    for n in range(3):
        img = ds.images[n]
        views = [img[:CROP, :CROP], img[:CROP, far:], img[far:, :CROP], img[far:, far:],
                 img[mid:mid + CROP, mid:mid + CROP]]
        views += [v[:, ::-1] for v in views]
        for v, view in enumerate(views):
            np.testing.assert_array_equal(rows[n * 10 + v], view)
    labels = np.concatenate([b.labels for b in batches])
    np.testing.assert_array_equal(labels, np.repeat(ds.labels[:3], 10))
    offsets, flips = ten_crop_offsets(S, CROP)
    np.testing.assert_array_equal(batches[0].offsets[:10], offsets)
    np.testing.assert_array_equal(batches[0].flips[:10], flips)


def test_centre_eval_batches_cover_the_split_in_order_and_honour_limit() -> None:
    ds, _ = small_dataset(n=11)
    batches = list(eval_batches(ds, 4, input_size=CROP))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), ds.labels)
    m = (S - CROP) // 2
    np.testing.assert_array_equal(batches[1].images[0], ds.images[4, m:m + CROP, m:m + CROP])
    assert not any(b.noise.any() or b.flips.any() for b in batches)
    assert len(list(eval_batches(ds, 4, input_size=CROP, limit=2))) == 2


def test_average_views_averages_each_images_ten_rows() -> None:
    probs = np.arange(2 * 10 * 3, dtype=np.float64).reshape(20, 3)
    np.testing.assert_allclose(average_views(probs), [probs[:10].mean(0), probs[10:].mean(0)])
    with pytest.raises(ValueError, match="multiple"):
        average_views(probs[:15])


def test_default_input_size_is_227_for_256_and_99_for_112() -> None:
    assert default_input_size(256) == 227 and default_input_size(112) == 99


# ----------------------------------------------------------------------------- network input


def slow_to_input(batch: Batch, stats: DataStats, mean_subtract: bool, dtype) -> np.ndarray:
    """Reference: subtract the mean before cropping and flipping, one image at a time."""
    out = []
    for k in range(len(batch)):
        r, c = batch.offsets[k]
        mean = stats.mean_image.astype(dtype) if mean_subtract else np.zeros((S, S, 3), dtype)
        # the crop of (image - mean) equals (crop of image) - (crop of mean) at the same place
        crop_mean = mean[r:r + CROP, c:c + CROP]
        if batch.flips[k]:
            crop_mean = crop_mean[:, ::-1]
        pixel = batch.images[k].astype(dtype)
        out.append((pixel - crop_mean) + batch.noise[k].astype(dtype))
    return np.stack(out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mean_subtract", [True, False])
def test_to_input_equals_slow_per_image_reference(dtype, mean_subtract: bool) -> None:
    ds, stats = small_dataset()
    cfg = small_cfg(mean_subtract=mean_subtract)
    batch = train_batch(ds, stats, 1, cfg)
    x = to_input(batch, stats, cfg, dtype=dtype)
    assert x.dtype == dtype and x.shape == (8, CROP, CROP, 3) and x.flags.c_contiguous
    np.testing.assert_array_equal(x, slow_to_input(batch, stats, mean_subtract, dtype))


def test_to_input_of_an_image_equal_to_the_mean_is_the_noise() -> None:
    rng = np.random.default_rng(2)
    mean = rng.integers(0, 256, (S, S, 3)).astype(np.uint8)
    ds = Dataset(np.repeat(mean[None], 9, axis=0), np.zeros(9, np.int64), ["a"])
    stats = DataStats(mean.astype(np.float32), np.ones(3, np.float32), np.eye(3, dtype=np.float32))
    cfg = small_cfg()
    batch = train_batch(ds, stats, 0, cfg)
    x = to_input(batch, stats, cfg)
    np.testing.assert_allclose(x, np.broadcast_to(batch.noise[:, None, None, :], x.shape),
                               atol=1e-4)


# ----------------------------------------------------------------------------- prefetcher


def test_prefetcher_yields_batches_in_order_from_start_step() -> None:
    made = []

    def make(step: int) -> int:
        made.append(step)
        return step * 10

    for depth in (0, 1, 3):
        made.clear()
        with Prefetcher(make, start_step=5, depth=depth) as p:
            got = [p.get(s)[0] for s in range(5, 12)]
        assert got == [50, 60, 70, 80, 90, 100, 110]
        assert made[:7] == list(range(5, 12))
    with Prefetcher(make, 0, 2) as p, pytest.raises(ValueError, match="expected step 0"):
        p.get(1)


def test_prefetcher_reraises_worker_exceptions_in_get() -> None:
    def make(step: int) -> int:
        if step == 2:
            raise KeyError("broken image 2")
        return step

    for depth in (0, 2):
        with Prefetcher(make, 0, depth) as p:
            assert p.get(0)[0] == 0 and p.get(1)[0] == 1
            with pytest.raises(KeyError, match="broken image 2"):
                p.get(2)


def test_prefetcher_reports_wait_and_close_stops_the_thread() -> None:
    def slow(step: int) -> int:
        time.sleep(0.05)
        return step

    before = threading.active_count()
    p = Prefetcher(slow, 0, 2)
    batch, wait = p.get(0)
    assert batch == 0 and wait > 0.02
    time.sleep(0.2)  # the worker fills the queue ahead
    _, wait = p.get(1)
    assert wait < 0.02
    p.close()
    assert threading.active_count() == before


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_dataset_is_deterministic_with_the_requested_counts() -> None:
    cfg = apply_overrides(load("tiny"), ["data.synthetic_train=50", "data.synthetic_val=20",
                                         "data.image_size=112"])
    train, val, stats = open_data(None, cfg)
    assert train.images.shape == (50, 112, 112, 3) and train.images.dtype == np.uint8
    assert val.images.shape == (20, 112, 112, 3) and len(val.labels) == 20
    assert train.classes == [f"class_{c:02d}" for c in range(10)]
    assert np.bincount(train.labels, minlength=10).tolist() == [5] * 10  # balanced
    other_seed = apply_overrides(cfg, ["train.seed=7"])  # the synthetic data ignores train.seed
    _synthetic_cached.cache_clear()  # regenerate from scratch: must be bit-identical
    train2, val2, stats2 = open_data(None, other_seed)
    np.testing.assert_array_equal(train.images, train2.images)
    np.testing.assert_array_equal(val.labels, val2.labels)
    np.testing.assert_array_equal(stats.mean_image, stats2.mean_image)
    assert stats.mean_image.shape == (112, 112, 3) and stats.eigval.shape == (3,)
    assert np.all(np.diff(stats.eigval) <= 0)  # descending


def nearest_centroid_accuracy(train_x, train_y, val_x, val_y) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mu) / sd, (val_x - mu) / sd
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(train_y.max() + 1)])
    guess = ((val_x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((guess == val_y).mean())


def test_synthetic_classes_live_in_the_pattern_not_in_the_mean_colour() -> None:
    train, val, _ = synthetic_dataset(400, 200, 64, 10)

    def spectrum(images: np.ndarray) -> np.ndarray:  # of a crop, per channel: crop-invariant
        x = images[:, 4:60, 4:60].astype(np.float32)
        return np.log1p(np.abs(np.fft.rfft2(x, axes=(1, 2)))[:, :10, :10]).reshape(len(x), -1)

    def mean_colour(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1, 3).mean(1)

    assert nearest_centroid_accuracy(spectrum(train.images), train.labels,
                                     spectrum(val.images), val.labels) > 0.6  # chance: 0.1
    assert nearest_centroid_accuracy(mean_colour(train.images), train.labels,
                                     mean_colour(val.images), val.labels) < 0.3


def test_compute_stats_matches_numpy_mean_and_covariance() -> None:
    rng = np.random.default_rng(3)
    images = (rng.normal(120, 40, (30, 8, 8, 3)) @ np.array([[1, .5, .2], [0, 1, .3], [0, 0, 1]])
              ).clip(0, 255).astype(np.uint8)
    stats = compute_stats(images, chunk=7)
    np.testing.assert_allclose(stats.mean_image, images.mean(axis=0), rtol=1e-6)
    cov = np.cov(images.reshape(-1, 3).T / 255.0, bias=True)
    np.testing.assert_allclose(stats.eigvec @ np.diag(stats.eigval) @ stats.eigvec.T, cov,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats.eigvec.T @ stats.eigvec, np.eye(3), atol=1e-6)
