"""Speed and memory measurements, each with its reference measured in the same run.

The machine is shared and noisy, so every figure is reported next to a ratio against NumPy's own
float32 matmul throughput measured on the same threads, in the same process, just before.
"""

from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits

from .comm import Comm
from .config import Config
from .data import Batch, DataStats, to_input
from .init import init_shard
from .layers import softmax_cross_entropy
from .model import Net
from .optim import SGD
from .partition import plan
from .sharing import share_batch


def matmul_gflops(n: int = 3072, repeat: int = 3) -> float:
    """Best float32 (n x n) @ (n x n) throughput of this process's BLAS threads, in GFLOP/s.

    One product first as warm-up: OpenBLAS runs slower until it has done a large one.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def forward_gemm_floor(config: Config, batch: int, repeat: int = 3) -> float:
    """Seconds of the bare matrix products a test-mode forward pass needs, on one process.

    For each layer, the product of its im2col matrix with its weight (per group), or its
    matrix-vector products for fc layers at small batch, without any other work: no layer built
    from the same BLAS calls can be faster.
    """
    rng = np.random.default_rng(0)
    total = 0.0
    for p in plan(config.model):
        groups = p.groups
        k = (p.c_in // groups) * p.spec.kernel ** 2
        a = rng.standard_normal((batch * p.out_hw ** 2, k), dtype=np.float32)
        w = rng.standard_normal((k, p.c_out // groups), dtype=np.float32)
        if p.spec.kind == "fc" and batch <= 4:
            w = np.ascontiguousarray(w.T)  # (c_out, c_in): one GEMV per row, like Linear
            run = lambda a=a, w=w: [w @ row for row in a]  # noqa: E731
        else:
            run = lambda a=a, w=w: a @ w  # noqa: E731
        run()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(groups):
                run()
            best = min(best, time.perf_counter() - t0)
        total += best
    return total


def training_flops_per_image(config: Config) -> float:
    """Multiply-adds x 2 x 3 (forward, input gradient, weight gradient): ~4.35 GFLOP for AlexNet."""
    return 6.0 * sum(p.macs for p in plan(config.model))


def _batch(config: Config, n: int, comm: Comm) -> tuple[Batch | None, DataStats]:
    size, stored = config.model.input_size, config.data.image_size
    stats = DataStats(np.full((stored, stored, 3), 110.0, np.float32),
                      np.ones(3, np.float32), np.eye(3, dtype=np.float32))
    if not comm.is_coordinator:
        return None, stats
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Batch(images, np.zeros((n, 2), np.int32), np.zeros(n, bool),
                 np.zeros((n, 3), np.float32), rng.integers(0, config.model.num_classes, n)), stats


def build(config: Config, comm: Comm) -> tuple[Net, SGD]:
    """The net of this rank with the paper's init, and its optimizer."""
    net = Net(config, comm, init_shard(config.model, config.train.seed, comm.rank, comm.size))
    return net, SGD(net.parameters(), net.gradients(), config.optim)


def time_forward(net: Net, config: Config, comm: Comm, batch: int = 2,
                 repeat: int = 5) -> float:
    """Best wall time of a test-mode forward pass of `batch` images (input already on device)."""
    x = np.random.default_rng(1).standard_normal(
        (batch, config.model.input_size, config.model.input_size, 3)).astype(np.float32)
    net.forward(x, train=False)
    best = float("inf")
    for _ in range(repeat):
        comm.barrier()
        t0 = time.perf_counter()
        net.forward(x, train=False)
        best = min(best, time.perf_counter() - t0)
    net.take_timings()
    return best


def time_training(net: Net, sgd: SGD, config: Config, comm: Comm, batch: int, steps: int,
                  warmup: int = 1) -> dict:
    """Full training steps (batch broadcast, input, forward, loss, backward, SGD).

    Returns:
        seconds per step (mean of `steps` after `warmup`), per-stage seconds per step
        {stage: [forward, backward]}, communication seconds and bytes per step (this rank).
    """
    data, stats = _batch(config, batch, comm)
    total, stage_times, comm_s, comm_bytes = 0.0, {}, 0.0, 0
    for step in range(warmup + steps):
        comm.barrier()
        comm.take_events()
        if step == warmup:
            net.take_timings()
        t0 = time.perf_counter()
        shared = share_batch(comm, data, config.model.input_size)
        x = to_input(shared, stats, config)
        logits = net.forward(x, train=True, step=step)
        dlogits = None
        if comm.is_coordinator:
            _, dlogits = softmax_cross_entropy(logits, data.labels)
        net.backward(dlogits)
        sgd.step(1e-9)
        net.zero_grad()
        seconds = time.perf_counter() - t0
        events = comm.take_events()
        if step >= warmup:
            total += seconds
            comm_s += sum(e.seconds for e in events)
            comm_bytes += sum(e.nbytes for e in events)
    for name, (f, b) in net.take_timings().items():
        stage_times[name] = [f / steps, b / steps]
    return {"step_seconds": total / steps, "stages": stage_times,
            "comm_seconds": comm_s / steps, "comm_bytes": comm_bytes / steps}


def one_thread_reference(config: Config, comm_self: Comm, batch: int, steps: int) -> dict:
    """The same training step on one process with one BLAS thread (for the speedup)."""
    with threadpool_limits(limits=1, user_api="blas"):
        net, sgd = build(config, comm_self)
        result = time_training(net, sgd, config, comm_self, batch, steps)
        result["matmul_gflops"] = matmul_gflops()
    return result
