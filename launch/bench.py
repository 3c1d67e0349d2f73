"""Speed and memory of AlexNet training, with NumPy's matmul throughput measured in the same run.

    python -m launch.bench                      # one process: forward for 2 images, a training
                                                #   step at batch 128, per-layer times, memory
    mpirun -n 2 python -m launch.bench          # the split: throughput, speedup over one process
                                                #   with one thread, communication share, memory
    python -m launch.bench --config tiny --batch 32 --steps 3     # quick look
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dualgpu_alexnet import bench, cli
from dualgpu_alexnet.comm import alone
from dualgpu_alexnet.runtime import peak_rss_mib


def _stages(result: dict, per: float) -> str:
    rows = sorted(result["stages"].items(), key=lambda kv: -sum(kv[1]))
    lines = [f"  {'stage':<16} {'forward s':>10} {'backward s':>11} {'share':>6}"]
    lines += [f"  {name:<16} {f:>10.3f} {b:>11.3f} {100 * (f + b) / per:>5.1f}%"
              for name, (f, b) in rows if f + b > 0.0005]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(parser)
    parser.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--no-reference", action="store_true", help="under mpirun: skip the "
                        "one-process, one-thread reference run")
    args = parser.parse_args(argv)

    def body(comm) -> int:
        cfg = cli.resolve_config(comm, args.config, args.overrides)
        threads = cli.configure_rank(comm, cfg)
        say = print if comm.is_coordinator else (lambda *a, **k: None)
        flops = bench.training_flops_per_image(cfg)
        comm.barrier()
        matmul = comm.allreduce_sum(np.array([bench.matmul_gflops()]))[0]  # all cores at once
        say(f"preset {cfg.model.name} | {comm.size} rank(s) x {threads} BLAS thread(s) | "
            f"float32 matmul on the same threads: {matmul:.1f} GFLOP/s")
        net, sgd = bench.build(cfg, comm)
        fwd = bench.time_forward(net, cfg, comm, batch=2)
        if comm.size == 1:
            floor = bench.forward_gemm_floor(cfg, batch=2)
            say(f"forward, 2 images (test mode): {fwd:.3f} s; its bare matrix products alone "
                f"take {floor:.3f} s on these threads ({100 * floor / fwd:.0f}% of it)")
        else:
            say(f"forward, 2 images (test mode): {fwd:.3f} s")
        result = bench.time_training(net, sgd, cfg, comm, args.batch, args.steps)
        per = result["step_seconds"]
        share = result["comm_seconds"] / per
        comm_max = comm.allreduce_max(np.array([share]))[0]
        comm_min = -comm.allreduce_max(np.array([-share]))[0]
        peak = comm.allreduce_max(np.array([peak_rss_mib()]))[0]
        achieved = flops * args.batch / per / 1e9
        say(f"training step, batch {args.batch}: {per:.2f} s = {args.batch / per:.1f} images/s "
            f"= {per / args.batch * 1e3:.1f} ms/image; {achieved:.1f} GFLOP/s = "
            f"{100 * achieved / matmul:.0f}% of the matmul throughput")
        say(f"communication: {100 * comm_min:.1f}% of the step on the rank that waits least, "
            f"{100 * comm_max:.1f}% on the one that waits most (time inside collectives, "
            f"waiting for the other rank included); {result['comm_bytes'] / 1e6:.1f} MB sent "
            "by rank 0 per step")
        say(f"peak memory per rank: {peak:.0f} MiB ({peak / 1024:.2f} GiB)")
        say("time per stage and step (rank 0):\n" + _stages(result, per))
        if comm.size > 1 and not args.no_reference:
            del net, sgd
            ref = None
            if comm.is_coordinator:  # the other rank waits: its core stays idle
                ref = bench.one_thread_reference(cfg, alone(), args.batch, args.steps)
            comm.barrier()
            if ref:
                say(f"one process, one thread, same code: {ref['step_seconds']:.2f} s per step "
                    f"-> speedup of {comm.size} ranks: {ref['step_seconds'] / per:.2f}x; "
                    f"matmul alone on one thread {ref['matmul_gflops']:.1f} GFLOP/s, so the "
                    f"cores themselves scale {matmul / ref['matmul_gflops']:.2f}x")
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
