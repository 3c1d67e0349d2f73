"""Every layer's backward equals central differences in float64; layer contracts hold."""

from __future__ import annotations

import numpy as np
import pytest

from dualgpu_alexnet.layers import (
    LRN,
    Conv2D,
    Dropout,
    FlattenCHW,
    Linear,
    MaxPool,
    ReLU,
    softmax,
    softmax_cross_entropy,
)

GRAD_TOL = 1e-6  # float64 central differences, eps 1e-6


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute difference relative to the largest magnitude of either array."""
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), 1e-30))


def numeric_grad(f, arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar f() with respect to arr, perturbed in place."""
    grad = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + eps
        f_plus = f()
        arr[idx] = old - eps
        f_minus = f()
        arr[idx] = old
        grad[idx] = (f_plus - f_minus) / (2 * eps)
    return grad


def check_gradients(layer, x: np.ndarray, seed: int = 0, **forward_kw) -> None:
    """Assert backward's dx and every parameter gradient equal central differences."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(layer.forward(x, **forward_kw).shape)  # loss = sum(y * r)

    def loss() -> float:
        return float(np.sum(layer.forward(x, **forward_kw) * r))

    layer.zero_grad()
    layer.forward(x, **forward_kw)
    dx = layer.backward(r.copy())
    analytic = {k: g.copy() for k, g in layer.grads.items()}
    if getattr(layer, "need_dx", True):
        assert dx.shape == x.shape
        assert rel_err(dx, numeric_grad(loss, x)) < GRAD_TOL
    else:
        assert dx is None
    for name, param in layer.params.items():
        assert rel_err(analytic[name], numeric_grad(loss, param)) < GRAD_TOL, name


def conv(rng, c_in, c_out, k, groups=1, **kw) -> Conv2D:
    w = rng.standard_normal((c_out, c_in // groups, k, k))
    return Conv2D(w, rng.standard_normal(c_out), groups=groups, **kw)


CONV_CASES = {  # name: (input shape, c_out, k, groups, stride, pad, need_dx)
    "stride4_5x5": ((2, 13, 13, 3), 4, 5, 1, 4, 0, True),
    "stride4_no_dx": ((1, 9, 9, 3), 3, 5, 1, 4, 0, False),
    "groups2_pad1": ((2, 6, 7, 4), 4, 3, 2, 1, 1, True),
    "5x5_pad2_groups2": ((1, 7, 7, 4), 6, 5, 2, 1, 2, True),
    "stride2_pad1": ((2, 7, 7, 2), 3, 3, 1, 2, 1, True),
}


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_gradients_match_central_differences(name):
    shape, c_out, k, groups, stride, pad, need_dx = CONV_CASES[name]
    rng = np.random.default_rng(len(name))
    layer = conv(rng, shape[3], c_out, k, groups, stride=stride, pad=pad, need_dx=need_dx)
    check_gradients(layer, rng.standard_normal(shape))


def test_relu_gradient_matches_central_differences():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 3, 4))
    x[np.abs(x) < 1e-2] = 0.5  # keep away from the kink
    check_gradients(ReLU(), x)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("alpha_over_n", [False, True])
@pytest.mark.parametrize("size", [5, 3])
def test_lrn_gradient_matches_central_differences(groups, alpha_over_n, size):
    rng = np.random.default_rng(groups * 7 + size)
    # 10 channels: windows clipped at both edges and, with groups=2, at the boundary 4|5;
    # alpha large enough that the cross-channel term is a sizeable part of the gradient
    layer = LRN(size=size, k=2.0, alpha=0.5, beta=0.75, alpha_over_n=alpha_over_n, groups=groups)
    check_gradients(layer, rng.standard_normal((2, 2, 3, 10)))


def test_lrn_gradient_general_beta():
    layer = LRN(size=5, k=1.0, alpha=0.3, beta=0.6, alpha_over_n=True, groups=2)
    check_gradients(layer, np.random.default_rng(4).standard_normal((1, 2, 2, 8)))


def test_lrn_window_stays_inside_its_group():
    x = np.zeros((1, 1, 1, 8))
    x[..., 3] = 10.0  # last channel of group 0
    y = LRN(size=5, k=1.0, alpha=1.0, beta=1.0, groups=2).forward(x)
    assert y[..., 3] == pytest.approx(10.0 / 101.0)
    np.testing.assert_array_equal(y, np.where(x > 0, y, 0))  # zeros stay zero everywhere
    dx = LRN(size=5, k=1.0, alpha=1.0, beta=1.0, groups=2)
    dx.forward(x)
    g = dx.backward(np.ones_like(x))
    assert np.all(g[..., 4:] == 1.0)  # group 1 never sees channel 3: d b_c / d a_c = 1 / k
    assert np.all(g[..., 1:3] != 1.0) and g[..., 0] == 1.0  # channels within 2 of it do


def test_lrn_matches_closed_form_paper_constants():
    x = np.arange(1.0, 6.0).reshape(1, 1, 1, 5)
    y = LRN().forward(x)  # k=2, n=5, alpha=1e-4, beta=0.75, alpha not divided by n
    sums = np.array([1 + 4 + 9, 1 + 4 + 9 + 16, 55, 4 + 9 + 16 + 25, 9 + 16 + 25])
    np.testing.assert_allclose(y.ravel(), x.ravel() / (2 + 1e-4 * sums) ** 0.75, rtol=1e-14)


def test_maxpool_gradient_matches_central_differences():
    x = np.random.default_rng(5).permutation(2 * 7 * 7 * 3).reshape(2, 7, 7, 3) * 0.1  # no ties
    check_gradients(MaxPool(3, 2), x.astype(np.float64))


def test_maxpool_ties_send_gradient_to_first_maximum_row_major():
    x = np.zeros((1, 5, 5, 1))
    x[0, 1, 0, 0] = x[0, 1, 2, 0] = 7.0  # window (0,0): tie within row 1 -> (1,0)
    x[0, 2, 4, 0] = x[0, 3, 2, 0] = 5.0  # window (1,1): (2,4) comes before (3,2) row-major
    pool = MaxPool(3, 2)
    y = pool.forward(x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[7.0, 7.0], [5.0, 5.0]])
    dx = pool.backward(np.array([1.0, 10.0, 100.0, 1000.0]).reshape(1, 2, 2, 1))
    expected = np.zeros((5, 5))
    expected[1, 0] = 1.0  # window (0,0)
    expected[1, 2] = 10.0  # window (0,1) spans columns 2..4: its first 7 is (1,2)
    expected[3, 2] = 100.0  # window (1,0) spans columns 0..2: its only 5 is (3,2)
    expected[2, 4] = 1000.0  # window (1,1): the tie goes to the earlier row, not column
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


def test_maxpool_all_equal_window_uses_top_left():
    pool = MaxPool(3, 2)
    pool.forward(np.ones((1, 5, 5, 2)))
    dx = pool.backward(np.ones((1, 2, 2, 2)))
    expected = np.zeros((5, 5))
    expected[::2, ::2][:2, :2] = 1.0  # top-left corners (0,0), (0,2), (2,0), (2,2)
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


def test_maxpool_output_sizes_of_alexnet():
    pool = MaxPool(3, 2)
    sizes = [pool.forward(np.zeros((1, s, s, 1)), train=False).shape[1] for s in (55, 27, 13)]
    assert sizes == [27, 13, 6]


@pytest.mark.parametrize("inverted", [False, True])
def test_dropout_gradient_and_test_time_scaling(inverted):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 6))
    keep = rng.random((4, 6)) >= 0.5
    layer = Dropout(0.5, inverted=inverted)
    check_gradients(layer, x, keep=keep)
    y = layer.forward(x, keep=keep)
    np.testing.assert_array_equal(y, x * keep * (2.0 if inverted else 1.0))
    np.testing.assert_array_equal(layer.forward(x, train=False), x if inverted else x * 0.5)
    expected = np.full_like(x, 1.0 if inverted else 0.5)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), expected)


def test_dropout_training_without_mask_is_an_error():
    with pytest.raises(ValueError, match="keep mask"):
        Dropout(0.5).forward(np.ones((2, 3)), train=True)
    with pytest.raises(ValueError, match="keep mask"):
        Dropout(0.5).forward(np.ones((2, 3)), keep=np.ones((3, 2), bool))


def test_linear_gradients_match_central_differences():
    rng = np.random.default_rng(7)
    layer = Linear(rng.standard_normal((5, 7)), rng.standard_normal(5))
    check_gradients(layer, rng.standard_normal((3, 7)))


def test_flatten_is_channel_row_column_order_and_inverts():
    x = np.random.default_rng(8).standard_normal((2, 3, 4, 5))  # (N, H, W, C)
    layer = FlattenCHW()
    y = layer.forward(x)
    assert y.shape == (2, 60)
    n, h, w, c = 1, 2, 3, 4
    assert y[n, c * 12 + h * 4 + w] == x[n, h, w, c]
    check_gradients(layer, x)
    dx = layer.backward(y)
    np.testing.assert_array_equal(dx, x)
    assert dx.flags.c_contiguous


def test_softmax_cross_entropy_gradient_and_closed_forms():
    rng = np.random.default_rng(9)
    logits, labels = rng.standard_normal((4, 6)), np.array([0, 5, 2, 2])
    _, dlogits = softmax_cross_entropy(logits, labels)
    grad = numeric_grad(lambda: softmax_cross_entropy(logits, labels)[0], logits)
    assert rel_err(dlogits, grad) < GRAD_TOL
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)
    loss, _ = softmax_cross_entropy(np.zeros((3, 10)), np.array([1, 2, 3]))
    assert loss == pytest.approx(np.log(10.0), rel=1e-14)
    big = np.array([[1e4, 0.0, -1e4]], np.float32)  # stable: no overflow
    loss, d = softmax_cross_entropy(big, np.array([1]))
    assert loss == pytest.approx(1e4, rel=1e-6) and np.isfinite(d).all()
    p = softmax(big)
    assert p.dtype == np.float32 and p[0, 0] == 1.0 and p.sum() == pytest.approx(1.0)


def test_softmax_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match="out of range"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="integers"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))


def param_layers(rng):
    return [conv(rng, 4, 6, 3, groups=2, pad=1), Linear(rng.standard_normal((3, 5)),
                                                          rng.standard_normal(3))]


def test_gradients_accumulate_across_backward_calls_and_zero_grad_resets():
    rng = np.random.default_rng(10)
    for layer, x in zip(param_layers(rng), [rng.standard_normal((2, 5, 5, 4)),
                                            rng.standard_normal((2, 5))], strict=True):
        dy = rng.standard_normal(layer.forward(x).shape)
        layer.backward(dy)
        once = {k: g.copy() for k, g in layer.grads.items()}
        layer.backward(dy)  # fan-out: a second consumer's gradient adds on
        for k, g in layer.grads.items():
            np.testing.assert_allclose(g, 2 * once[k], rtol=1e-14)
            assert np.abs(once[k]).max() > 0
        layer.zero_grad()
        assert all(not g.any() for g in layer.grads.values())


def float32_cases(rng):
    f32 = np.float32
    conv_layer = Conv2D(rng.standard_normal((4, 2, 3, 3)).astype(f32), np.zeros(4, f32),
                        pad=1, groups=2)
    linear = Linear(rng.standard_normal((3, 5)).astype(f32), np.zeros(3, f32))
    img, vec = (2, 7, 7, 4), (2, 5)
    return [(conv_layer, img, {}), (ReLU(), img, {}), (LRN(groups=2), img, {}),
            (MaxPool(), img, {}), (Dropout(0.5), vec, {"keep": np.ones(vec, bool)}),
            (Dropout(0.5, inverted=True), vec, {"keep": np.ones(vec, bool)}),
            (linear, vec, {}), (FlattenCHW(), img, {})]


def test_float32_in_float32_out_for_every_layer():
    rng = np.random.default_rng(11)
    for layer, shape, kw in float32_cases(rng):
        x = rng.standard_normal(shape).astype(np.float32)
        y = layer.forward(x, **kw)
        dx = layer.backward(np.ones_like(y))
        assert y.dtype == np.float32 and dx.dtype == np.float32, type(layer).__name__
        assert all(g.dtype == np.float32 for g in layer.grads.values())
        assert layer.forward(x, train=False).dtype == np.float32
    logits = rng.standard_normal((2, 4)).astype(np.float32)
    loss, d = softmax_cross_entropy(logits, np.array([0, 1]))
    assert d.dtype == np.float32 and isinstance(loss, float)


def test_inplace_relu_reuses_buffers_and_default_does_not():
    x = np.array([-1.0, 2.0, -3.0, 4.0])
    y = ReLU().forward(x)
    assert y is not x and x[0] == -1.0
    relu = ReLU(inplace=True)
    y = relu.forward(x)
    assert y is x and np.array_equal(x, [0.0, 2.0, 0.0, 4.0])
    dy = np.ones(4)
    assert relu.backward(dy) is dy and np.array_equal(dy, [0.0, 1.0, 0.0, 1.0])


def test_backward_after_test_time_forward_is_an_error():
    rng = np.random.default_rng(12)
    for layer in [conv(rng, 2, 2, 3), ReLU(), LRN(), MaxPool(), Linear(np.ones((2, 2)),
                                                                       np.zeros(2))]:
        shape = (1, 2, 2) if isinstance(layer, Linear) else (1, 5, 5, 2)
        layer.forward(np.ones(shape[: 2 if isinstance(layer, Linear) else 4]), train=False)
        with pytest.raises(ValueError, match="train=True"):
            layer.backward(np.ones(1))


@pytest.mark.parametrize("n", [1, 2, 4, 5, 9])
def test_linear_small_batch_path_equals_the_gemm_path(n):
    from dualgpu_alexnet.layers import SMALL_BATCH

    rng = np.random.default_rng(n)
    w, b = rng.standard_normal((7, 5)), rng.standard_normal(7)
    x = rng.standard_normal((n, 5))
    y = Linear(w, b).forward(x, train=False)
    assert (n <= SMALL_BATCH) == (n <= 4)
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-12, atol=1e-12)
