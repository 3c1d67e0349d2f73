"""Fast layer kernels equal their slow float64 references (forward and backward)."""

from __future__ import annotations

import numpy as np
import pytest

from dualgpu_alexnet import layers
from dualgpu_alexnet.kernels import (
    Workspace,
    conv2d_backward,
    conv2d_forward,
    conv2d_reference,
    conv2d_reference_backward,
    conv_output_size,
    lrn_reference,
    lrn_reference_backward,
    maxpool_reference,
    maxpool_reference_backward,
)
from dualgpu_alexnet.layers import LRN, MaxPool

# (forward, gradient) relative tolerances per dtype
TOL = {np.float64: (1e-12, 1e-11), np.float32: (2e-6, 2e-5)}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute difference relative to the largest magnitude of either array."""
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / scale)


# (n, h, w, c_in, c_out, k, stride, pad, groups)
CONV_CASES = [
    (2, 13, 13, 3, 4, 5, 4, 0, 1),  # conv1-like stride-4 kernel
    (2, 11, 11, 3, 6, 11, 4, 0, 1),  # kernel as large as the input
    (3, 7, 9, 4, 6, 3, 1, 1, 2),  # groups=2, padding, non-square
    (2, 9, 9, 6, 4, 5, 1, 2, 2),  # conv2-like 5x5 pad 2 grouped
    (2, 8, 8, 4, 4, 3, 2, 1, 1),  # stride 2 with padding
    (1, 6, 6, 6, 6, 3, 1, 1, 3),  # three groups
    (2, 5, 5, 2, 3, 3, 1, 2, 1),  # padding larger than needed: taps fully outside
    (4, 10, 10, 2, 2, 4, 3, 1, 2),  # even kernel, stride 3
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}h{}w{}c{}o{}k{}s{}p{}g{}".format(*c))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])  # one image per chunk / whole batch
def test_conv_fast_matches_reference(case, dtype, chunk_bytes):
    n, h, w, c_in, c_out, k, stride, pad, groups = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((n, h, w, c_in)).astype(dtype)
    wt = rng.standard_normal((c_out, c_in // groups, k, k)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype)
    ws = Workspace()
    y = conv2d_forward(x, wt, b, stride, pad, groups, ws, chunk_bytes)
    ho, wo = conv_output_size(h, k, stride, pad), conv_output_size(w, k, stride, pad)
    assert y.shape == (n, ho, wo, c_out) and y.dtype == dtype
    fwd_tol, grad_tol = TOL[dtype]
    assert rel_err(y, conv2d_reference(x, wt, b, stride, pad, groups)) < fwd_tol
    dy = rng.standard_normal(y.shape).astype(dtype)
    dw, db = np.zeros_like(wt), np.zeros_like(b)
    dx = conv2d_backward(x, wt, dy, dw, db, stride, pad, groups, True, ws, chunk_bytes)
    dx_ref, dw_ref, db_ref = conv2d_reference_backward(x, wt, dy, stride, pad, groups)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    assert rel_err(dx, dx_ref) < grad_tol
    assert rel_err(dw, dw_ref) < grad_tol
    assert rel_err(db, db_ref) < grad_tol


def test_conv_without_dx_returns_none_and_same_weight_gradient():
    rng = np.random.default_rng(0)
    x, wt = rng.standard_normal((2, 13, 13, 3)), rng.standard_normal((4, 3, 5, 5))
    dy = rng.standard_normal((2, 3, 3, 4))
    dw, db = np.zeros_like(wt), np.zeros(4)
    assert conv2d_backward(x, wt, dy, dw, db, 4, 0, 1, need_dx=False) is None
    _, dw_ref, db_ref = conv2d_reference_backward(x, wt, dy, 4, 0, 1)
    assert rel_err(dw, dw_ref) < 1e-12 and rel_err(db, db_ref) < 1e-12


def test_conv_workspace_survives_batch_size_change():
    rng = np.random.default_rng(1)
    wt, b = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    ws = Workspace()
    for n in (3, 2, 5):
        x = rng.standard_normal((n, 6, 6, 4))
        y = conv2d_forward(x, wt, b, 1, 1, 2, ws, chunk_bytes=2000)
        assert rel_err(y, conv2d_reference(x, wt, b, 1, 1, 2)) < 1e-12


def test_conv_reference_closed_forms():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 3))
    w1 = rng.standard_normal((6, 3, 1, 1))
    y = conv2d_reference(x, w1, np.zeros(6))
    np.testing.assert_allclose(y, x @ w1[:, :, 0, 0].T, rtol=1e-12)  # 1x1 conv is a matmul
    delta = np.zeros((3, 3, 3, 3))
    delta[np.arange(3), np.arange(3), 2, 0] = 1.0  # picks the input one row down, one left
    y = conv2d_reference(x, delta, np.zeros(3), pad=1)
    np.testing.assert_array_equal(y[:, :-1, 1:], x[:, 1:, :-1])


def test_conv_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="channels"):
        conv2d_forward(np.zeros((1, 5, 5, 3)), np.zeros((4, 2, 3, 3)), np.zeros(4), groups=2)


# (channels, groups, size, alpha_over_n, beta)
LRN_CASES = [
    (16, 1, 5, False, 0.75),
    (16, 2, 5, False, 0.75),  # window clipped at the group boundary
    (12, 2, 5, True, 0.75),
    (10, 2, 3, False, 0.6),  # general beta (np.power path)
    (6, 2, 5, False, 0.75),  # groups of 3 <= 2*(size//2): every window clipped
    (5, 1, 7, True, 0.75),  # window wider than the channels
    (48, 2, 5, False, 0.75),  # per-device conv1 width
    (4, 1, 1, False, 0.75),  # size 1: no neighbours
]


@pytest.mark.parametrize("case", LRN_CASES, ids=lambda c: "c{}g{}n{}aon{}b{}".format(*c))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])
def test_lrn_fast_matches_reference(case, dtype, chunk_bytes, monkeypatch):
    monkeypatch.setattr(layers, "CHUNK_BYTES", chunk_bytes)
    c, groups, size, alpha_over_n, beta = case
    rng = np.random.default_rng(c * 10 + groups)
    x = (np.abs(rng.standard_normal((2, 3, 4, c))) * 20).astype(dtype)  # post-ReLU magnitudes
    kw = dict(size=size, k=2.0, alpha=1e-3, beta=beta, alpha_over_n=alpha_over_n, groups=groups)
    layer = LRN(**kw)
    y = layer.forward(x)
    y_ref, _ = lrn_reference(x, **kw)
    fwd_tol, grad_tol = TOL[dtype]
    assert y.dtype == dtype and rel_err(y, y_ref) < fwd_tol
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype and rel_err(dx, lrn_reference_backward(x, dy, **kw)) < grad_tol


# (n, h, w, c, size, stride)
POOL_CASES = [(2, 11, 11, 3, 3, 2), (2, 13, 12, 4, 3, 2), (1, 8, 8, 2, 2, 2), (2, 7, 7, 3, 3, 1),
              (3, 6, 6, 5, 3, 3), (2, 8, 9, 2, 2, 3)]  # last: stride > size leaves gaps


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "n{}h{}w{}c{}k{}s{}".format(*c))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_fast_matches_reference(case, dtype, ties):
    n, h, w, c, size, stride = case
    rng = np.random.default_rng(h * w + c)
    x = rng.integers(0, 3, (n, h, w, c)) if ties else rng.standard_normal((n, h, w, c))
    x = x.astype(dtype)
    layer = MaxPool(size, stride)
    y = layer.forward(x)
    y_ref = maxpool_reference(x, size, stride)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)  # max is exact
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype
    assert rel_err(dx, maxpool_reference_backward(x, dy, size, stride)) < TOL[dtype][1]


def test_layers_accept_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 7, 8, 6))
    x = base[:, :, ::-1]  # negative strides, not C-contiguous
    wt, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y = conv2d_forward(x, wt, b, 2, 1, 2)
    assert rel_err(y, conv2d_reference(x, wt, b, 2, 1, 2)) < 1e-12
    y_lrn = LRN(groups=2).forward(x)
    assert rel_err(y_lrn, lrn_reference(x, groups=2)[0]) < 1e-12
    np.testing.assert_array_equal(MaxPool().forward(x), maxpool_reference(x))
