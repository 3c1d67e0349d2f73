"""Run a few SGD steps of a preset on 1 process or 2 ranks and save everything at rank 0.

    python tests/mpi_scripts/equivalence.py OUT.npz [--config tiny] [--dtype float64] [--steps 3]
    mpirun -n 2 python tests/mpi_scripts/equivalence.py OUT.npz ...

Saves, per step: the logits and loss at the coordinator, and every whole gradient (gathered);
after the last step every whole weight. Used by tests/test_split_equivalence.py. With
--naive-backward the cross-layer backward keeps its own slice instead of reduce-scattering.
"""

import argparse

import numpy as np

from dualgpu_alexnet import config as config_mod
from dualgpu_alexnet.comm import install_abort_on_exception, world
from dualgpu_alexnet.init import init_shard
from dualgpu_alexnet.layers import softmax_cross_entropy
from dualgpu_alexnet.mappings import GatherChannels
from dualgpu_alexnet.model import Net
from dualgpu_alexnet.optim import SGD
from dualgpu_alexnet.state import gather_whole


class NaiveSplitBackward(GatherChannels):
    """Wrong on purpose: backward keeps this rank's slice of dy without summing over ranks."""

    def backward(self, dy):
        c = dy.shape[-1] // self.comm.size
        return np.ascontiguousarray(dy[..., self.comm.rank * c:(self.comm.rank + 1) * c])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--config", default="tiny")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--naive-backward", action="store_true")
    args = p.parse_args()
    comm = world(watchdog_seconds=120)
    install_abort_on_exception(comm.rank)
    cfg = config_mod.load(args.config, [f"model.dtype={args.dtype}", *args.set])
    net = Net(cfg, comm, init_shard(cfg.model, cfg.train.seed, comm.rank, comm.size))
    if args.naive_backward:
        for i, (name, layer) in enumerate(net.stages):
            if isinstance(layer, GatherChannels):
                net.stages[i] = (name, NaiveSplitBackward(comm, layer.layer))
    sgd = SGD(net.parameters(), net.gradients(), cfg.optim)
    rng = np.random.default_rng(1234)
    size, classes = cfg.model.input_size, cfg.model.num_classes
    saved = {}
    for step in range(args.steps):
        x = (rng.standard_normal((args.batch, size, size, 3)) * 50).astype(args.dtype)
        labels = rng.integers(0, classes, args.batch)
        logits = net.forward(x, train=True, step=step)
        dlogits = None
        if comm.is_coordinator:
            loss, dlogits = softmax_cross_entropy(logits, labels)
            saved[f"step{step}.logits"] = np.array(logits)
            saved[f"step{step}.loss"] = np.array(loss)
        net.backward(dlogits)
        grads = gather_whole(net.gradients(), cfg.model, comm, prefix=f"step{step}.grad.")
        if comm.is_coordinator:
            saved.update(grads)
        sgd.step(0.01)
        net.zero_grad()
    weights = gather_whole(net.parameters(), cfg.model, comm, prefix="final.")
    if comm.is_coordinator:
        saved.update(weights)
        np.savez(args.out, **saved)


if __name__ == "__main__":
    main()
