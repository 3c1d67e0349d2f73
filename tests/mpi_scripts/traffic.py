"""Record the communication of one real training step, per rank, as JSON.

    mpirun -n 2 python tests/mpi_scripts/traffic.py OUT_DIR [--set model.fc8=device0] ...

Runs the Trainer for one step (tiny preset, batch 4) and writes OUT_DIR/rank<r>.json with the
events of that step (layer, op, direction, bytes sent) in call order, and the dtype and shape of
the images this rank received. Used by tests/test_traffic.py.
"""

import argparse
import json
from pathlib import Path

from dualgpu_alexnet import config as config_mod
from dualgpu_alexnet import trainer as trainer_mod
from dualgpu_alexnet.comm import install_abort_on_exception, world
from dualgpu_alexnet.trainer import RunOptions, Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    comm = world(watchdog_seconds=60)
    install_abort_on_exception(comm.rank)
    cfg = config_mod.load("tiny", ["train.batch_size=4", "train.eval_batches=1", *args.set])
    out = Path(args.out)
    trainer = Trainer(cfg, comm, RunOptions(out=str(out / "run"), steps=1, quiet=True))
    received, step_events = [], []

    def share_batch(*a, **kw):  # what reached this rank
        batch = real_share_batch(*a, **kw)
        received.append({"dtype": str(batch.images.dtype), "shape": list(batch.images.shape)})
        return batch

    def step(*a, **kw):  # the events of exactly one training step
        before = len(comm.events)
        result = real_step(*a, **kw)
        step_events.extend(comm.events[before:])
        return result

    real_share_batch, trainer_mod.share_batch = trainer_mod.share_batch, share_batch
    real_step, trainer._step = trainer._step, step
    trainer.run()
    trainer_mod.share_batch = real_share_batch
    record = {"events": [[e.layer, e.op, e.direction, e.nbytes] for e in step_events],
              "received": received[0]}
    (out / f"rank{comm.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
