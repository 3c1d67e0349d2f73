"""Top-1 / top-5 error of a checkpoint on a validation set, centre crop or the paper's 10 crops.

    python -m launch.evaluate --checkpoint runs/x/checkpoint.npz --data CACHE_OR_FOLDER
    mpirun -n 2 python -m launch.evaluate --checkpoint ... --data ... --crops ten
"""

from __future__ import annotations

import argparse
import json
import sys

from dualgpu_alexnet import cli
from dualgpu_alexnet.data import open_data
from dualgpu_alexnet.evaluate import evaluate
from dualgpu_alexnet.inference import load_for_inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint to evaluate")
    parser.add_argument("--data", help="image folder or prepared cache whose val split is used "
                        "(default: the embedded synthetic data)")
    parser.add_argument("--crops", choices=("center", "ten", "both"), default="both",
                        help="centre crop, the paper's 10 crops, or both (default)")
    parser.add_argument("--batches", type=int, default=0, help="evaluate only this many batches")
    cli.add_config_args(parser)
    args = parser.parse_args(argv)

    def body(comm) -> int:
        model = load_for_inference(args.checkpoint, comm, args.config, args.overrides)
        cli.configure_rank(comm, model.config)
        opened = comm.on_coordinator(lambda: open_data(args.data, model.config),
                                     (ValueError, OSError))
        val = opened[1] if opened else None
        results = {}
        for crops in (("center", "ten") if args.crops == "both" else (args.crops,)):
            results[crops] = evaluate(model.net, comm, val, model.stats, model.config,
                                      crops=crops, limit=args.batches)
        if comm.is_coordinator:
            for crops, r in results.items():
                print(f"{crops:>6} crop{'s' if crops == 'ten' else ''}: top-1 error "
                      f"{r['top1_err']:.4f}, top-5 error {r['top5_err']:.4f} "
                      f"({r['images']} images)")
            print(json.dumps({k: v for k, v in results.items()}))
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
