"""Train AlexNet the 2012 way: each of two ranks owns half of every layer's channels.

    mpirun -n 2 python -m launch.train                       # paper split, embedded synthetic data
    mpirun -n 2 python -m launch.train --data CACHE --out runs/imagenet
    python -m launch.train --config tiny --steps 20          # one process holds both devices
    mpirun -n 2 python -m launch.train --resume runs/imagenet
"""

from __future__ import annotations

import argparse
import sys

from dualgpu_alexnet import cli
from dualgpu_alexnet.trainer import NonFiniteError, RunOptions, Trainer, TrainingInterrupted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(parser)
    parser.add_argument("--data", help="image folder (DIR/train/<class>/*, DIR/val/<class>/*) "
                        "or a cache made by launch.prepare; default: embedded synthetic data")
    parser.add_argument("--out", help="run directory (default: runs/<preset>-<date>-<time>)")
    parser.add_argument("--steps", type=int, help="training steps (default: from the config; "
                        "train.demo_steps on the synthetic data)")
    parser.add_argument("--epochs", type=float, help="training epochs (default: train.epochs)")
    parser.add_argument("--batch-size", type=int, help="images per step, whole pair "
                        "(same as --set train.batch_size=N)")
    parser.add_argument("--seed", type=int, help="seed (same as --set train.seed=N)")
    parser.add_argument("--init", metavar="CKPT", help="start from the weights of a checkpoint "
                        "in the conventional layout (ours, or converted from Caffe/PyTorch)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR exactly where its "
                        "checkpoint.npz left off (its config.toml is used)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")

    def body(comm) -> int:
        config = cli.resolve_config(comm, args.config, overrides, saved_run=args.resume)
        cli.configure_rank(comm, config)
        opts = RunOptions(data=args.data, out=args.out, init=args.init, resume=args.resume,
                          steps=args.steps, epochs=args.epochs, quiet=args.quiet)
        try:
            Trainer(config, comm, opts).run()
        except NonFiniteError as e:
            if comm.is_coordinator:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return cli.EXIT_NONFINITE
        except TrainingInterrupted:
            return cli.EXIT_INTERRUPTED
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
