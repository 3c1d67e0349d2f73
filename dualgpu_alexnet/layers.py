"""AlexNet-2012 layers in NumPy: forward/backward pairs on NHWC activations, no MPI, no optimizer.

Conventions (the model builder is written against them):

- Activations are NHWC (N, H, W, C); fc activations (N, features). Every layer computes in the
  float dtype of its input (float32 for work, float64 for gradient checks) and never upcasts.
- Parameters keep the PyTorch/Caffe layouts: conv weight (c_out, c_in // groups, kh, kw), linear
  weight (c_out, c_in), biases (c_out,). Layers are handed their arrays (never initialise them)
  and keep references, so an optimizer updating `params` in place is seen by the layer.
- `forward(x, train=True)` caches only what `backward` needs (nothing when train=False);
  `backward(dy)` returns dx (None when need_dx=False) and ACCUMULATES parameter gradients into
  `grads` with += (fan-out correct); `zero_grad()` resets them.
- Conv groups follow Caffe: group g reads input channels g*c_in/groups.. and writes output
  channels g*c_out/groups... LRN groups: the channel window never crosses a group boundary.
- Max-pooling ties: the gradient goes to the FIRST maximum of the window in row-major order.
- Dropout draws no random numbers: the caller passes the keep-mask.

Fast paths: conv via im2col/GEMM (kernels.py); LRN, pooling and ReLU work on cache-sized chunks
with in-place ufuncs. Slow reference twins live in kernels.py (tests only).
"""

from __future__ import annotations

import numpy as np

from .kernels import (
    Workspace,
    channel_window_sum,
    conv2d_backward,
    conv2d_forward,
    conv_output_size,
)

SMALL_BATCH = 4  # Linear: batches up to this size use one matrix-vector product per row
CHUNK_BYTES = 256 << 10  # LRN / pooling working set per chunk (fits in L2 with its temporaries)


def _chunks(n: int, step: int):
    """(start, stop) pairs covering range(n) in steps of `step`."""
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _float_input(x: np.ndarray, layer: str) -> np.ndarray:
    """x as a floating array; ValueError for other dtypes."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{layer} wants a float array, got dtype {x.dtype}")
    return x


class Layer:
    """Base: parameters, gradients accumulated with +=, zero_grad."""

    def __init__(self, **params: np.ndarray) -> None:
        self.params: dict[str, np.ndarray] = params
        self.grads: dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in params.items()}

    def zero_grad(self) -> None:
        """Reset every accumulated gradient to zero."""
        for g in self.grads.values():
            g.fill(0)


class Conv2D(Layer):
    """Grouped 2-D convolution with zero padding (NHWC in, NHWC out).

    Args:
        weight: (c_out, c_in // groups, kh, kw).
        bias: (c_out,).
        stride, pad, groups: as in Caffe; floor output size.
        need_dx: False skips the input gradient (conv1, whose input is the image).
    """

    def __init__(self, weight, bias, stride: int = 1, pad: int = 0, groups: int = 1,
                 need_dx: bool = True) -> None:
        if weight.ndim != 4 or bias.shape != (weight.shape[0],) or weight.shape[0] % groups:
            raise ValueError(f"Conv2D weight {weight.shape} / bias {bias.shape} / groups {groups}")
        super().__init__(weight=weight, bias=bias)
        self.stride, self.pad, self.groups, self.need_dx = stride, pad, groups, need_dx
        self.ws = Workspace()
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x (N, H, W, c_in) -> y (N, Ho, Wo, c_out)."""
        x = _float_input(x, "Conv2D")
        self._x = x if train else None
        w, b = self.params["weight"], self.params["bias"]
        return conv2d_forward(x, w, b, self.stride, self.pad, self.groups, self.ws)

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        """dy (N, Ho, Wo, c_out) -> dx (N, H, W, c_in), or None when need_dx is False."""
        if self._x is None:
            raise ValueError("Conv2D.backward needs a forward with train=True first")
        return conv2d_backward(self._x, self.params["weight"], dy, self.grads["weight"],
                               self.grads["bias"], self.stride, self.pad, self.groups,
                               self.need_dx, self.ws)


class ReLU(Layer):
    """max(x, 0); caches a bool mask.

    Args:
        inplace: overwrite x in forward and dy in backward (only when nobody else holds them).
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.ws = Workspace()
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """y = max(x, 0), same shape and dtype."""
        x = _float_input(x, "ReLU")
        self._mask = np.greater(x, 0, out=self.ws.get("mask", x.shape, bool)) if train else None
        return np.maximum(x, 0, out=x if self.inplace else None)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dx = dy where x > 0, else 0."""
        if self._mask is None:
            raise ValueError("ReLU.backward needs a forward with train=True first")
        return np.multiply(dy, self._mask, out=dy if self.inplace else None)


class LRN(Layer):
    """Cross-channel local response normalisation (Krizhevsky 2012).

    b_c = a_c / (k + alpha' * sum_{j=c-size//2}^{c+size//2} a_j^2)^beta, alpha' = alpha/size if
    alpha_over_n else alpha; the window is clipped at the edges of each of `groups` equal
    channel groups (groups=1: across all channels; groups=2: per device).

    Args:
        size: odd window length; k, alpha, beta: the constants above.
        alpha_over_n: divide alpha by size (Caffe, cuda-convnet2) or not (the paper).
        groups: number of channel groups the window must not cross.
    """

    def __init__(self, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75,
                 alpha_over_n: bool = False, groups: int = 1) -> None:
        if size < 1 or size % 2 == 0 or groups < 1:
            raise ValueError(f"LRN size={size} must be odd and positive, groups={groups} >= 1")
        super().__init__()
        self.size, self.k, self.beta, self.groups = size, k, beta, groups
        self.alpha_eff = alpha / size if alpha_over_n else alpha
        self.ws = Workspace()
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """a (N, H, W, C) -> b (N, H, W, C)."""
        a = _float_input(x, "LRN")
        c = a.shape[-1]
        if c % self.groups:
            raise ValueError(f"LRN channels {c} not divisible by groups {self.groups}")
        c_g, dt = c // self.groups, a.dtype
        a1 = a.reshape(-1)  # flat, channels fastest
        y = np.empty_like(a)
        y1 = y.reshape(-1)
        if train:  # internal caches, reused across steps: s^-beta and -2 alpha' beta s^(-beta-1)
            scale = self.ws.get("scale", a1.shape, dt)
            qcoef = self.ws.get("qcoef", a1.shape, dt)
        step = max(1, CHUNK_BYTES // (c * a.itemsize)) * c  # whole pixels per chunk
        sq, s, r = (self.ws.get(name, (step,), dt) for name in ("sq", "s", "r"))
        for e0, e1 in _chunks(a1.size, step):
            n, ac = e1 - e0, a1[e0:e1]
            sc, rc = s[:n], (scale[e0:e1] if train else r[:n])
            np.multiply(ac, ac, out=sq[:n])
            channel_window_sum(sq[:n], sc, rc, c_g, self.size // 2)
            sc *= self.alpha_eff
            sc += self.k
            if self.beta == 0.75:  # s^-0.75 = sqrt(sqrt(s)) / s, far faster than np.power
                np.sqrt(sc, out=rc)
                np.sqrt(rc, out=rc)
                rc /= sc
            else:
                np.power(sc, -self.beta, out=rc)
            np.multiply(ac, rc, out=y1[e0:e1])
            if train:
                np.divide(rc, sc, out=qcoef[e0:e1])
                qcoef[e0:e1] *= -2.0 * self.alpha_eff * self.beta
        self._cache = (a1, scale, qcoef) if train else None
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dx_i = dy_i s_i^-beta - 2 alpha' beta a_i sum_{c: i in win(c)} dy_c a_c s_c^(-beta-1)."""
        if self._cache is None:
            raise ValueError("LRN.backward needs a forward with train=True first")
        a1, scale, qcoef = self._cache
        c = dy.shape[-1]
        dy1 = dy.reshape(-1)
        if dy1.size != a1.size:
            raise ValueError(f"LRN dy {dy.shape} does not match the forward input")
        dx = np.empty(dy.shape, a1.dtype)
        dx1 = dx.reshape(-1)
        step = max(1, CHUNK_BYTES // (c * a1.itemsize)) * c
        t, u, tmp = (self.ws.get(name, (step,), a1.dtype) for name in ("sq", "s", "r"))
        for e0, e1 in _chunks(a1.size, step):
            n, ac, dyc, dxc = e1 - e0, a1[e0:e1], dy1[e0:e1], dx1[e0:e1]
            np.multiply(dyc, ac, out=t[:n])
            t[:n] *= qcoef[e0:e1]  # -2 alpha' beta dy_c a_c s_c^(-beta-1)
            channel_window_sum(t[:n], u[:n], tmp, c // self.groups, self.size // 2)  # symmetric
            np.multiply(ac, u[:n], out=dxc)
            np.multiply(dyc, scale[e0:e1], out=t[:n])
            dxc += t[:n]
        return dx


class MaxPool(Layer):
    """Overlapping max-pooling without padding, floor output size (55->27->13->6 for 3/2).

    Ties: the gradient goes to the FIRST maximum in row-major window order (deterministic).

    Args:
        size: window side; stride: step between windows.
    """

    def __init__(self, size: int = 3, stride: int = 2) -> None:
        if size < 1 or stride < 1 or size * size > 255:
            raise ValueError(f"MaxPool size={size} stride={stride} out of range")
        super().__init__()
        self.size, self.stride = size, stride
        self.ws = Workspace()
        self._cache: tuple[tuple[int, ...], np.ndarray] | None = None

    def _views(self, x: np.ndarray, ho: int, wo: int):
        """(k, strided view) for every window offset k = i*size + j, in row-major order."""
        s = self.stride
        for i in range(self.size):
            rows = slice(i, i + s * (ho - 1) + 1, s)
            for j in range(self.size):
                yield i * self.size + j, x[:, rows, j : j + s * (wo - 1) + 1 : s]

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x (N, H, W, C) -> y (N, Ho, Wo, C)."""
        x = _float_input(x, "MaxPool")
        if x.ndim != 4:
            raise ValueError(f"MaxPool wants (N, H, W, C), got {x.shape}")
        n, hi, wi, c = x.shape
        ho = conv_output_size(hi, self.size, self.stride, 0)
        wo = conv_output_size(wi, self.size, self.stride, 0)
        if ho < 1 or wo < 1:
            raise ValueError(f"MaxPool input {x.shape} smaller than window {self.size}")
        y = np.empty((n, ho, wo, c), x.dtype)
        if train:  # first-argmax offset per output, an internal cache reused across steps
            idx = self.ws.get("idx", y.shape, np.uint8)
        nb = max(1, CHUNK_BYTES // (hi * wi * c * x.itemsize))
        mask = self.ws.get("mask", (nb, ho, wo, c), np.uint8)
        for n0, n1 in _chunks(n, nb):
            m, yc = n1 - n0, y[n0:n1]
            views = self._views(x[n0:n1], ho, wo)
            np.copyto(yc, next(views)[1])
            if train:
                idx[n0:n1] = 0
            for k, v in views:
                if train:
                    # strictly greater keeps the first maximum; later k win, so idx = max(k*mask)
                    np.greater(v, yc, out=mask[:m].view(bool))
                    mask[:m] *= np.uint8(k)
                    np.maximum(idx[n0:n1], mask[:m], out=idx[n0:n1])
                np.maximum(yc, v, out=yc)
        self._cache = (x.shape, idx) if train else None
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (N, Ho, Wo, C) -> dx (N, H, W, C), routed to each window's first maximum."""
        if self._cache is None:
            raise ValueError("MaxPool.backward needs a forward with train=True first")
        shape, idx = self._cache
        n, ho, wo, c = idx.shape
        dx = np.zeros(shape, dy.dtype)
        nb = max(1, CHUNK_BYTES // (shape[1] * shape[2] * c * dy.itemsize))
        mask = self.ws.get("mask", (nb, ho, wo, c), np.uint8).view(bool)
        tmp = self.ws.get("tmp", (nb, ho, wo, c), dy.dtype)
        for n0, n1 in _chunks(n, nb):
            m = n1 - n0
            for k, v in self._views(dx[n0:n1], ho, wo):  # overlapping windows add up in turn
                np.equal(idx[n0:n1], k, out=mask[:m])
                np.multiply(dy[n0:n1], mask[:m], out=tmp[:m])
                v += tmp[:m]
        return dx


class Dropout(Layer):
    """Dropout with a caller-supplied keep-mask (the layer draws no random numbers).

    Paper style: y = x*keep in training, x*(1-p) at test. Inverted: y = x*keep/(1-p) in
    training, identity at test.

    Args:
        p: drop probability; inverted: scale at training time instead of test time.
    """

    def __init__(self, p: float = 0.5, inverted: bool = False) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout p={p} must be in [0, 1)")
        super().__init__()
        self.p, self.inverted = p, inverted
        self._keep: np.ndarray | None = None
        self._train = True

    def forward(self, x: np.ndarray, train: bool = True,
                keep: np.ndarray | None = None) -> np.ndarray:
        """x -> y, same shape; keep (bool, x's shape) is required when train is True."""
        x = _float_input(x, "Dropout")
        self._train = train
        if not train:
            self._keep = None
            return x if self.inverted else x * x.dtype.type(1.0 - self.p)
        if keep is None or keep.shape != x.shape or keep.dtype != np.bool_:
            got = None if keep is None else (keep.shape, keep.dtype)
            raise ValueError(f"Dropout in training needs a bool keep mask of shape {x.shape}, "
                             f"got {got}")
        self._keep = keep
        y = x * keep
        if self.inverted:
            y *= x.dtype.type(1.0 / (1.0 - self.p))
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dx = dy * d(y)/d(x) of the last forward (mask and scale, or the test-time scale)."""
        if not self._train:
            return dy if self.inverted else dy * dy.dtype.type(1.0 - self.p)
        dx = dy * self._keep
        if self.inverted:
            dx *= dy.dtype.type(1.0 / (1.0 - self.p))
        return dx


class Linear(Layer):
    """Fully connected layer y = x @ W.T + b.

    Args:
        weight: (c_out, c_in); bias: (c_out,).
        need_dx: False skips the input gradient.
    """

    def __init__(self, weight, bias, need_dx: bool = True) -> None:
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"Linear weight {weight.shape} / bias {bias.shape} mismatch")
        super().__init__(weight=weight, bias=bias)
        self.need_dx = need_dx
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x (N, c_in) -> y (N, c_out)."""
        x = _float_input(x, "Linear")
        if x.ndim != 2 or x.shape[1] != self.params["weight"].shape[1]:
            raise ValueError(f"Linear input {x.shape} vs weight {self.params['weight'].shape}")
        self._x = x if train else None
        w = self.params["weight"].astype(x.dtype, copy=False)
        if x.shape[0] <= SMALL_BATCH:  # one GEMV per row: OpenBLAS sgemm with M=2 runs ~10x
            y = np.stack([w @ row for row in x])  # below memory speed on this machine
        else:
            y = x @ w.T  # (N, c_out)
        y += self.params["bias"].astype(x.dtype, copy=False)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        """dy (N, c_out) -> dx (N, c_in) or None."""
        if self._x is None:
            raise ValueError("Linear.backward needs a forward with train=True first")
        self.grads["weight"] += dy.T @ self._x  # (c_out, c_in)
        self.grads["bias"] += dy.sum(axis=0)
        if not self.need_dx:
            return None
        return dy @ self.params["weight"].astype(dy.dtype, copy=False)


class FlattenCHW(Layer):
    """(N, H, W, C) NHWC -> (N, C*H*W) in (channel, row, column) order, the fc6 input order."""

    def __init__(self) -> None:
        super().__init__()
        self._shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x (N, H, W, C) -> (N, C*H*W)."""
        self._shape = x.shape
        return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # (N, C*H*W), copies

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (N, C*H*W) -> dx (N, H, W, C)."""
        n, h, w, c = self._shape
        return np.ascontiguousarray(dy.reshape(n, c, h, w).transpose(0, 2, 3, 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise numerically stable softmax of (N, classes) logits, in their dtype."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the batch and its gradient.

    Args:
        logits: (N, classes) float.
        labels: (N,) integer class ids in [0, classes).

    Returns:
        (loss, dlogits): the mean loss as a float, and dloss/dlogits (N, classes), already / N.
    """
    labels = np.asarray(labels)
    n, classes = logits.shape
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({n},) integers, got {labels.shape} {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels out of range [0, {classes}): {labels.min()}..{labels.max()}")
    z = logits - logits.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(z).sum(axis=1))  # (N,)
    loss = float(np.mean(logsum - z[np.arange(n), labels]))
    dlogits = softmax(logits)
    dlogits[np.arange(n), labels] -= 1
    dlogits /= n
    return loss, dlogits
