"""Micro benchmark of one device's AlexNet layers at full size, 1 BLAS thread.

    python -m launch.bench_layers [--batch 128] [--repeat 3] [--only conv1 lrn1 ...]

Prints the best-of-repeat forward and backward CPU time (robust on a shared machine) of every
layer, GFLOP/s for the convolutions and their ratio to a (4096 x 4096) @ (4096 x 4096) float32
matmul measured in the same run (best of before and after the layers).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from dualgpu_alexnet.layers import LRN, Conv2D, MaxPool, ReLU

CONVS = {  # name: (H, W, c_in, c_out, kernel, stride, pad, need_dx), per device
    "conv1": (227, 227, 3, 48, 11, 4, 0, False),
    "conv2": (27, 27, 48, 128, 5, 1, 2, True),
    "conv3": (13, 13, 256, 192, 3, 1, 1, True),
    "conv4": (13, 13, 192, 192, 3, 1, 1, True),
    "conv5": (13, 13, 192, 128, 3, 1, 1, True),
}
OTHERS = {  # name: (input H, W, C; layer class with the paper's defaults)
    "relu1": ((55, 55, 48), ReLU), "lrn1": ((55, 55, 48), LRN), "pool1": ((55, 55, 48), MaxPool),
    "relu2": ((27, 27, 128), ReLU), "lrn2": ((27, 27, 128), LRN),
    "pool2": ((27, 27, 128), MaxPool), "relu3": ((13, 13, 192), ReLU),
    "relu4": ((13, 13, 192), ReLU), "relu5": ((13, 13, 128), ReLU),
    "pool5": ((13, 13, 128), MaxPool),
}


def best_of(fn, repeat: int) -> tuple[float, object]:
    """Minimum CPU time of `repeat` calls of fn() and its last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return min(times), out


def time_layer(layer, x: np.ndarray, repeat: int) -> tuple[float, float, np.ndarray]:
    """(forward s, backward s, y) of a layer, with y fed back as dy."""
    t_fwd, y = best_of(lambda: layer.forward(x), repeat)
    t_bwd, _ = best_of(lambda: layer.backward(y), repeat)
    return t_fwd, t_bwd, y


def matmul_gflops(rng, repeat: int) -> float:
    """GFLOP/s of a 4096^3 float32 matmul."""
    a = rng.standard_normal((4096, 4096), dtype=np.float32)
    t, _ = best_of(lambda: a @ a, repeat)
    return 2 * 4096**3 / t / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.bench_layers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="layer names to run")
    args = ap.parse_args(argv)
    rng, n, wanted = np.random.default_rng(0), args.batch, set(args.only or [*CONVS, *OTHERS])
    rows, t_conv, t_other = [], 0.0, 0.0
    with threadpool_limits(1):
        mm = matmul_gflops(rng, args.repeat)
        for name, (h, w, c_in, c_out, k, stride, pad, need_dx) in CONVS.items():
            if name in wanted:
                weight = rng.standard_normal((c_out, c_in, k, k), dtype=np.float32) * 0.01
                layer = Conv2D(weight, np.zeros(c_out, np.float32), stride, pad, 1, need_dx)
                x = rng.standard_normal((n, h, w, c_in), dtype=np.float32)
                tf, tb, y = time_layer(layer, x, args.repeat)
                flop = 2 * y.size * c_in * k * k * (3 if need_dx else 2)  # fwd + dW (+ dx)
                rows.append((name, x.shape[1:], tf, tb, flop / (tf + tb) / 1e9))
                t_conv += tf + tb
        for name, (shape, cls) in OTHERS.items():
            if name in wanted:
                x = np.maximum(rng.standard_normal((n, *shape), dtype=np.float32), 0)
                tf, tb, _ = time_layer(cls(), x, args.repeat)
                rows.append((name, x.shape[1:], tf, tb, None))
                t_other += tf + tb
        mm = max(mm, matmul_gflops(rng, args.repeat))
    print(f"matmul 4096^3 float32, 1 thread: {mm:.1f} GFLOP/s; batch {n}, best of {args.repeat}")
    print(f"{'layer':6s} {'input':>14s} {'fwd s':>7s} {'bwd s':>7s} {'GFLOP/s':>8s} /matmul")
    for name, shape, tf, tb, rate in rows:
        tail = f" {rate:8.1f} {rate / mm:7.2f}" if rate else ""
        print(f"{name:6s} {str(shape):>14s} {tf:7.3f} {tb:7.3f}{tail}")
    share = f"{100 * t_other / t_conv:.1f}% of conv" if t_conv else "no convs run"
    print(f"convs fwd+bwd {t_conv:.3f} s; relu+lrn+pool fwd+bwd {t_other:.3f} s ({share})")


if __name__ == "__main__":
    main()
