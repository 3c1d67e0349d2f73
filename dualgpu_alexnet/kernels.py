"""Fast NHWC kernels (convolution by im2col/GEMM, LRN window sums) and slow reference twins.

Layout: activations (N, H, W, C); conv weight (c_out, c_in // groups, kh, kw) as in PyTorch/Caffe;
group g reads input channels g*c_in/groups.. and writes output channels g*c_out/groups...

The fast path works on batch chunks so the im2col matrix of one chunk stays small (cache
friendly, bounded memory): forward copies the (kh, kw, c) windows of a zero-padded chunk into a
(rows, kh*kw*c) matrix and does one GEMM per group; backward recomputes the columns for dW =
cols^T @ dy, and gets dx as a transposed convolution: for every kernel offset (i, j) one GEMM
dy @ W[:, :, i, j] whose (rows, c) result is added, shifted, into dx (long contiguous adds, no
col2im scatter). The `*_reference` functions are direct loops in float64, used only by tests.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

CHUNK_BYTES = 16 << 20  # im2col bytes per batch chunk: >= ~1700 GEMM rows on AlexNet shapes


class Workspace:
    """Named scratch buffers reused across calls; a new shape or dtype replaces the old buffer."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype, zero: bool = False) -> np.ndarray:
        """Buffer `name` of this shape and dtype; `zero=True` zeroes it when (re)allocated."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
            buf = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
            self._buffers[name] = buf
        return buf


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Floor output size of a convolution or pooling window along one axis."""
    return (size + 2 * pad - kernel) // stride + 1


def _check_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int):
    """Validate conv arguments; return (ho, wo)."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv wants x (N,H,W,C) and w (co,ci,kh,kw), got {x.shape}, {w.shape}")
    c_out, c_in_g, kh, kw = w.shape
    if x.shape[3] != c_in_g * groups or c_out % groups:
        raise ValueError(
            f"conv channels: x has {x.shape[3]}, weight {w.shape} with groups={groups}"
        )
    if stride < 1 or pad < 0:
        raise ValueError(f"conv stride={stride} must be >= 1 and pad={pad} >= 0")
    ho = conv_output_size(x.shape[1], kh, stride, pad)
    wo = conv_output_size(x.shape[2], kw, stride, pad)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv input {x.shape[1:3]} too small for kernel {(kh, kw)}, pad {pad}")
    return ho, wo


def _windows(src: np.ndarray, kh: int, kw: int, stride: int, ho: int, wo: int) -> np.ndarray:
    """Read-only (N, ho, wo, kh, kw, C) view of the kernel windows of src (N, Hp, Wp, C)."""
    sn, sh, sw, sc = src.strides
    shape = (src.shape[0], ho, wo, kh, kw, src.shape[3])
    strides = (sn, stride * sh, stride * sw, sh, sw, sc)
    return as_strided(src, shape, strides, writeable=False)


def _padded_chunk(x: np.ndarray, n0: int, n1: int, pad: int, ws: Workspace, nb: int):
    """x[n0:n1] zero-padded in H and W, written into a reused buffer whose border stays zero."""
    if pad == 0:
        return x[n0:n1]
    n, h, w, c = x.shape
    buf = ws.get("xpad", (nb, h + 2 * pad, w + 2 * pad, c), x.dtype, zero=True)
    buf[: n1 - n0, pad : pad + h, pad : pad + w] = x[n0:n1]
    return buf[: n1 - n0]  # (m, H+2p, W+2p, C)


def _im2col(src, kh, kw, stride, ho, wo, ws: Workspace, nb: int) -> np.ndarray:
    """Copy the windows of src (m, Hp, Wp, c) into a reused (m*ho*wo, kh*kw*c) matrix."""
    m, c = src.shape[0], src.shape[3]
    cols = ws.get("cols", (nb, ho, wo, kh, kw, c), src.dtype)[:m]
    np.copyto(cols, _windows(src, kh, kw, stride, ho, wo))
    return cols.reshape(m * ho * wo, kh * kw * c)


def _batch_chunk(n: int, bytes_per_image: int, chunk_bytes: int | None) -> int:
    """Images per chunk so that one chunk's im2col matrix stays within chunk_bytes."""
    limit = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(n, limit // max(1, bytes_per_image)))


def _weight_matrices(w: np.ndarray, groups: int, dtype) -> np.ndarray:
    """(groups, kh*kw*ci_g, co_g) GEMM operands matching the im2col column order (kh, kw, c)."""
    c_out, c_in_g, kh, kw = w.shape
    wg = w.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(0, 3, 4, 2, 1)
    return np.ascontiguousarray(wg, dtype=dtype).reshape(groups, kh * kw * c_in_g, -1)


def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    stride: int = 1,
    pad: int = 0,
    groups: int = 1,
    ws: Workspace | None = None,
    chunk_bytes: int | None = None,
) -> np.ndarray:
    """Grouped 2-D convolution, im2col + one GEMM per group and batch chunk.

    Args:
        x: input (N, H, W, c_in); its dtype is the compute dtype.
        w: weight (c_out, c_in // groups, kh, kw).
        b: bias (c_out,).
        stride, pad, groups: as in Caffe (zero padding, floor output size).
        ws: scratch buffers to reuse across calls.
        chunk_bytes: bound on the im2col matrix of one batch chunk (default CHUNK_BYTES).

    Returns:
        y (N, Ho, Wo, c_out) in x.dtype.
    """
    ho, wo = _check_conv(x, w, stride, pad, groups)
    ws = ws or Workspace()
    n = x.shape[0]
    c_out, c_in_g, kh, kw = w.shape
    co_g = c_out // groups
    wmat = _weight_matrices(w, groups, x.dtype)  # (groups, kh*kw*ci_g, co_g)
    bias = b.astype(x.dtype, copy=False)
    y = np.empty((n, ho, wo, c_out), x.dtype)
    nb = _batch_chunk(n, ho * wo * kh * kw * c_in_g * x.itemsize, chunk_bytes)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        src = _padded_chunk(x, n0, n1, pad, ws, nb)  # (m, Hp, Wp, c_in)
        y2 = y[n0:n1].reshape(-1, c_out)  # (m*ho*wo, c_out)
        for g in range(groups):
            gi = slice(g * c_in_g, (g + 1) * c_in_g)
            cols = _im2col(src[..., gi], kh, kw, stride, ho, wo, ws, nb)  # (m*ho*wo, kh*kw*ci_g)
            np.matmul(cols, wmat[g], out=y2[:, g * co_g : (g + 1) * co_g])
        y2 += bias
    return y


def _clip(offset: int, pad: int, stride: int, size_in: int, size_out: int):
    """Outputs o0..o1 whose tap `offset` lands inside the unpadded input, and its first row."""
    o0 = max(0, -(-(pad - offset) // stride))
    o1 = min(size_out, (size_in - 1 + pad - offset) // stride + 1)
    return o0, o1, o0 * stride + offset - pad


def conv2d_backward(
    x: np.ndarray,
    w: np.ndarray,
    dy: np.ndarray,
    dw: np.ndarray,
    db: np.ndarray,
    stride: int = 1,
    pad: int = 0,
    groups: int = 1,
    need_dx: bool = True,
    ws: Workspace | None = None,
    chunk_bytes: int | None = None,
) -> np.ndarray | None:
    """Backward of conv2d_forward; ACCUMULATES into dw and db (+=).

    Args:
        x: the forward input (N, H, W, c_in).
        w: weight (c_out, c_in // groups, kh, kw).
        dy: output gradient (N, Ho, Wo, c_out).
        dw, db: gradient accumulators shaped like w and the bias.
        need_dx: False skips the input gradient entirely.

    Returns:
        dx (N, H, W, c_in) in x.dtype, or None when need_dx is False.
    """
    ho, wo = _check_conv(x, w, stride, pad, groups)
    if dy.shape != (x.shape[0], ho, wo, w.shape[0]):
        raise ValueError(f"conv dy shape {dy.shape} != {(x.shape[0], ho, wo, w.shape[0])}")
    ws = ws or Workspace()
    n, h, wd, c_in = x.shape
    c_out, c_in_g, kh, kw = w.shape
    co_g, kdim = c_out // groups, kh * kw * c_in_g
    dt = x.dtype
    dy = dy.astype(dt, copy=False)
    dwmat = np.zeros((groups, kdim, co_g), dt)
    partial = ws.get("dw_partial", (kdim, co_g), dt)
    db_acc = np.zeros(c_out, dt)
    dx = np.zeros_like(x) if need_dx else None
    # (kh, kw, c_out, ci_g): W[:, :, i, j] rows per output channel, for dx = dy @ W_ij
    wtap = np.ascontiguousarray(w.transpose(2, 3, 0, 1), dtype=dt) if need_dx else None
    nb = _batch_chunk(n, ho * wo * kdim * x.itemsize, chunk_bytes)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        src = _padded_chunk(x, n0, n1, pad, ws, nb)  # (m, Hp, Wp, c_in)
        dy2 = dy[n0:n1].reshape(-1, c_out)  # (m*ho*wo, c_out)
        db_acc += dy2.sum(axis=0)
        for g in range(groups):
            gi, go = slice(g * c_in_g, (g + 1) * c_in_g), slice(g * co_g, (g + 1) * co_g)
            cols = _im2col(src[..., gi], kh, kw, stride, ho, wo, ws, nb)  # (m*ho*wo, kdim)
            np.matmul(cols.T, dy2[:, go], out=partial)
            dwmat[g] += partial
            if dx is not None:
                _shifted_dx(dx[n0:n1, ..., gi], dy2[:, go], wtap[:, :, go], stride, pad, ws, nb)
    # (groups, kh, kw, ci_g, co_g) -> (c_out, ci_g, kh, kw)
    dwmat = dwmat.reshape(groups, kh, kw, c_in_g, co_g).transpose(0, 4, 3, 1, 2)
    dw += dwmat.reshape(c_out, c_in_g, kh, kw)
    db += db_acc
    return dx


def _shifted_dx(dx, dy2, wtap, stride: int, pad: int, ws: Workspace, nb: int) -> None:
    """dx (m, H, W, ci) += sum over taps (i, j) of dy2 @ W_ij placed at the tap's input rows."""
    m, h, wd, c_in = dx.shape
    kh, kw = wtap.shape[:2]
    ho, wo = conv_output_size(h, kh, stride, pad), conv_output_size(wd, kw, stride, pad)
    tap = ws.get("dx_tap", (nb, ho, wo, c_in), dx.dtype)[:m]
    tap2 = tap.reshape(-1, c_in)  # (m*ho*wo, ci)
    for i in range(kh):
        oy0, oy1, y0 = _clip(i, pad, stride, h, ho)
        for j in range(kw):
            ox0, ox1, x0 = _clip(j, pad, stride, wd, wo)
            if oy1 <= oy0 or ox1 <= ox0:
                continue
            np.matmul(dy2, wtap[i, j], out=tap2)
            ys = slice(y0, y0 + stride * (oy1 - oy0 - 1) + 1, stride)
            xs = slice(x0, x0 + stride * (ox1 - ox0 - 1) + 1, stride)
            dx[:, ys, xs] += tap[:, oy0:oy1, ox0:ox1]


def channel_window_sum(src: np.ndarray, out: np.ndarray, tmp: np.ndarray, c_g: int,
                       half: int) -> None:
    """out[p, c] = sum of src[p, j] for |j - c| <= half within c's group of c_g channels.

    src, out: flat (pixels * groups * c_g,) chunks, channels fastest; tmp: scratch as long.
    Interior channels come from shifted sums over the flat chunk (long contiguous adds, pairs
    summed once in tmp); the `half` channels at each group edge, whose flat neighbours belong to
    another pixel or group, are then recomputed from their clipped window.
    """
    n = src.size
    m = n - 2 * half  # outputs with a full flat window: out[half : n - half]
    if half == 0:
        np.copyto(out, src)
        return
    if m > 0:
        pairs = tmp[: n - 1]
        np.add(src[:-1], src[1:], out=pairs)  # src[i] + src[i+1]
        np.add(pairs[0:m], src[2 * half : n], out=out[half : n - half])
        for e in range(1, half):
            out[half : n - half] += pairs[2 * e : 2 * e + m]
    s2, q2 = out.reshape(-1, c_g), src.reshape(-1, c_g)  # (pixels * groups, c_g)
    if c_g > 2 * half:  # edge windows stay inside the group: running sums from each edge
        np.add(q2[:, 0], q2[:, 1], out=s2[:, 0])
        np.add(q2[:, -1], q2[:, -2], out=s2[:, -1])
        for i in range(2, half + 1):
            s2[:, 0] += q2[:, i]
            s2[:, -1] += q2[:, -1 - i]
        for j in range(1, half):
            np.add(s2[:, j - 1], q2[:, j + half], out=s2[:, j])
            np.add(s2[:, -j], q2[:, -1 - j - half], out=s2[:, -1 - j])
        return
    for j in range(c_g):  # tiny groups: every channel's window is clipped
        lo, hi = max(0, j - half), min(c_g, j + half + 1)
        np.copyto(s2[:, j], q2[:, lo])
        for i in range(lo + 1, hi):
            s2[:, j] += q2[:, i]


# ---- slow references (float64, direct loops): tests only ----


def conv2d_reference(x, w, b, stride: int = 1, pad: int = 0, groups: int = 1) -> np.ndarray:
    """Direct-loop grouped convolution in float64: y[n,oy,ox,o] = sum(window * w[o]) + b[o]."""
    ho, wo = _check_conv(x, w, stride, pad, groups)
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    w = np.asarray(w, np.float64)
    c_out, c_in_g, kh, kw = w.shape
    co_g = c_out // groups
    y = np.zeros((x.shape[0], ho, wo, c_out))
    for o in range(c_out):
        g = o // co_g
        kernel = w[o].transpose(1, 2, 0)  # (kh, kw, ci_g)
        for oy in range(ho):
            for ox in range(wo):
                win = x[:, oy * stride : oy * stride + kh, ox * stride : ox * stride + kw,
                        g * c_in_g : (g + 1) * c_in_g]  # (N, kh, kw, ci_g)
                y[:, oy, ox, o] = (win * kernel).sum(axis=(1, 2, 3)) + b[o]
    return y


def conv2d_reference_backward(x, w, dy, stride: int = 1, pad: int = 0, groups: int = 1):
    """Direct-loop float64 gradients of conv2d_reference; returns (dx, dw, db)."""
    ho, wo = _check_conv(x, w, stride, pad, groups)
    n, h, wd, _ = x.shape
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    w, dy = np.asarray(w, np.float64), np.asarray(dy, np.float64)
    c_out, c_in_g, kh, kw = w.shape
    co_g = c_out // groups
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for o in range(c_out):
        gi = slice((o // co_g) * c_in_g, (o // co_g + 1) * c_in_g)
        kernel = w[o].transpose(1, 2, 0)  # (kh, kw, ci_g)
        for oy in range(ho):
            for ox in range(wo):
                rows = slice(oy * stride, oy * stride + kh)
                cols = slice(ox * stride, ox * stride + kw)
                g = dy[:, oy, ox, o][:, None, None, None]  # (N, 1, 1, 1)
                dw[o] += (xp[:, rows, cols, gi] * g).sum(axis=0).transpose(2, 0, 1)
                dxp[:, rows, cols, gi] += g * kernel
    db = dy.sum(axis=(0, 1, 2))
    return dxp[:, pad : pad + h, pad : pad + wd], dw, db


def lrn_reference(x, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75,
                  alpha_over_n: bool = False, groups: int = 1):
    """Channel-loop float64 LRN; returns (y, s) with s the denominators' base (k + alpha' sum)."""
    x = np.asarray(x, np.float64)
    c_g, half = x.shape[-1] // groups, size // 2
    alpha_eff = alpha / size if alpha_over_n else alpha
    s = np.empty_like(x)
    for c in range(x.shape[-1]):
        first = (c // c_g) * c_g  # the window is clipped to this channel's group
        lo, hi = max(first, c - half), min(first + c_g - 1, c + half)
        s[..., c] = k + alpha_eff * (x[..., lo : hi + 1] ** 2).sum(axis=-1)
    return x / s**beta, s


def lrn_reference_backward(x, dy, size: int = 5, k: float = 2.0, alpha: float = 1e-4,
                           beta: float = 0.75, alpha_over_n: bool = False, groups: int = 1):
    """Float64 dx of lrn_reference, summing d b_c / d a_i term by term over the windows."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    _, s = lrn_reference(x, size, k, alpha, beta, alpha_over_n, groups)
    c_g, half = x.shape[-1] // groups, size // 2
    alpha_eff = alpha / size if alpha_over_n else alpha
    dx = dy * s**-beta  # the direct term d b_i / d a_i through the numerator
    for c in range(x.shape[-1]):
        first = (c // c_g) * c_g
        for i in range(max(first, c - half), min(first + c_g - 1, c + half) + 1):
            # d b_c / d a_i through the denominator of b_c
            dx[..., i] -= dy[..., c] * x[..., c] * beta * s[..., c] ** (-beta - 1) \
                * 2 * alpha_eff * x[..., i]
    return dx


def maxpool_reference(x, size: int = 3, stride: int = 2) -> np.ndarray:
    """Loop-over-windows max-pooling without padding, floor output size."""
    n, h, w, c = x.shape
    ho, wo = conv_output_size(h, size, stride, 0), conv_output_size(w, size, stride, 0)
    y = np.empty((n, ho, wo, c), x.dtype)
    for oy in range(ho):
        for ox in range(wo):
            win = x[:, oy * stride : oy * stride + size, ox * stride : ox * stride + size]
            y[:, oy, ox] = win.max(axis=(1, 2))
    return y


def maxpool_reference_backward(x, dy, size: int = 3, stride: int = 2) -> np.ndarray:
    """dx of maxpool_reference: each window's dy goes to its first row-major maximum."""
    n, h, w, c = x.shape
    dx = np.zeros(x.shape, np.float64)
    for b in range(n):
        for oy in range(dy.shape[1]):
            for ox in range(dy.shape[2]):
                for ch in range(c):
                    y0, x0 = oy * stride, ox * stride
                    first = int(np.argmax(x[b, y0 : y0 + size, x0 : x0 + size, ch]))  # row-major
                    dx[b, y0 + first // size, x0 + first % size, ch] += dy[b, oy, ox, ch]
    return dx
