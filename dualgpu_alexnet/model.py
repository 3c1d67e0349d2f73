"""Build the network held by one rank, from the config and the split table.

One builder serves one process and two ranks. A rank hosts `devices // world_size` devices: under
`mpirun -n 2` one device (its half of every layer; collectives cross to the other rank), on one
process both (local layers become grouped convolutions, per-device LRN windows become channel
groups, and the collectives are identities), which makes the one-process net the reference.

    net = Net(config, comm, params)   # params: this rank's shards, conventional names
    logits = net.forward(x, train=True, step=s)  # (N, classes) at the coordinator, None elsewhere
    net.backward(dlogits)                         # dlogits at the coordinator, None elsewhere
"""

from __future__ import annotations

import time

import numpy as np

from .comm import Comm
from .config import Config
from .layers import LRN, Conv2D, Dropout, FlattenCHW, Linear, MaxPool, ReLU
from .mappings import ChannelCrop, ChannelHalo, GatherChannels, GatherToRoot
from .partition import (
    DEVICE0,
    GATHERED,
    IMAGE,
    LOCAL,
    POOL_SIZE,
    POOL_STRIDE,
    LayerPlan,
    lrn_halo,
    plan,
)


class Net:
    """This rank's part of AlexNet as a sequence of named stages (layers and collectives).

    Args:
        config: the run config (model section used; train.seed seeds dropout).
        comm: the model's communicator (world_size 1 or model.devices).
        params: this rank's parameter shards, e.g. "conv1.weight" (48, 3, 11, 11) on 2 ranks.
    """

    def __init__(self, config: Config, comm: Comm, params: dict[str, np.ndarray]):
        self.config, self.comm = config, comm
        m = config.model
        world, rank = comm.size, comm.rank
        hosted = m.devices // world  # devices this rank hosts
        self.stages: list[tuple[str, object]] = []
        # dropout stage -> (layer index, width of the whole layer, this rank's columns)
        self.dropout_slices: dict[str, tuple[int, int, slice]] = {}
        self.layer_params: dict[str, dict[str, np.ndarray]] = {}
        previous_kind = "conv"
        for index, p in enumerate(plan(m)):
            spec, name = p.spec, p.name
            if spec.input == GATHERED:
                if p.owner == DEVICE0:
                    self._add(f"{name}.gather", GatherToRoot(comm, name, root=0))
                else:
                    self._add(f"{name}.gather", GatherChannels(comm, name))
            if spec.kind == "fc" and previous_kind == "conv":
                self._add("flatten", FlattenCHW())
            previous_kind = spec.kind
            if f"{name}.weight" not in params:
                break  # this rank holds none of this layer (fc8 kept on device 0)
            weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
            if spec.kind == "conv":
                groups = hosted if spec.input == LOCAL else 1
                layer = Conv2D(weight, bias, stride=spec.stride, pad=spec.pad, groups=groups,
                               need_dx=spec.input != IMAGE)
            else:
                layer = Linear(weight, bias)
            self._add(name, layer)
            self.layer_params[name] = layer.params
            if spec.relu:  # in place: its input is the fresh output of conv/fc, held by no one
                self._add(f"{name}.relu", ReLU(inplace=True))
            post = []
            if spec.lrn:
                post.append(self._lrn_stages(p, hosted))
            if spec.pool:
                post.append([(f"{name}.pool", MaxPool(POOL_SIZE, POOL_STRIDE))])
            if m.lrn_place == "after_pool":
                post.reverse()
            for stages in post:
                for stage in stages:
                    self._add(*stage)
            if spec.dropout and m.dropout > 0:
                stage = f"{name}.dropout"
                self._add(stage, Dropout(m.dropout, inverted=m.dropout_inverted))
                self.dropout_slices[stage] = (index, p.c_out, p.out_slice(rank, world))
        last = plan(m)[-1]
        if last.owner != DEVICE0 and f"{last.name}.weight" in params:
            self._add("logits.gather", GatherToRoot(comm, "logits", root=comm.coordinator))
        self.timings: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in self.stages}

    def _lrn_stages(self, p: LayerPlan, hosted: int) -> list[tuple[str, object]]:
        """LRN within each device's channels, or across all (a halo exchange when split)."""
        m, name = self.config.model, p.name
        halo, _ = lrn_halo(m, p)  # channels the window reaches into the neighbouring device
        lrn = LRN(size=m.lrn_size, k=m.lrn_k, alpha=m.lrn_alpha, beta=m.lrn_beta,
                  alpha_over_n=m.lrn_alpha_over_n,
                  groups=1 if m.lrn_scope == "all" else hosted)
        if not (halo and self.comm.size > 1):
            return [(f"{name}.lrn", lrn)]
        return [(f"{name}.lrn.halo", ChannelHalo(self.comm, f"{name}.lrn", halo)),
                (f"{name}.lrn", lrn), (f"{name}.lrn.crop", ChannelCrop(halo))]

    def _add(self, name: str, layer: object) -> None:
        self.stages.append((name, layer))

    # -- parameters ----------------------------------------------------------------------------

    def parameters(self) -> dict[str, np.ndarray]:
        """This rank's parameters under conventional names ("conv3.weight", ...)."""
        return {f"{layer}.{k}": v for layer, ps in self.layer_params.items() for k, v in ps.items()}

    def gradients(self) -> dict[str, np.ndarray]:
        """Accumulated gradients, same names and shapes as parameters()."""
        grads = {}
        for name, layer in self.stages:
            if name in self.layer_params:
                grads.update({f"{name}.{k}": v for k, v in layer.grads.items()})
        return grads

    def layer_grads(self, name: str) -> list[np.ndarray]:
        """Gradients of layer `name` ("fc6") held by this rank; [] if it holds none."""
        layer = dict(self.stages).get(name)
        return list(layer.grads.values()) if name in self.layer_params else []

    def zero_grad(self) -> None:
        for _, layer in self.stages:
            layer.zero_grad()

    # -- passes --------------------------------------------------------------------------------

    def dropout_mask(self, stage: str, batch: int, step: int) -> np.ndarray:
        """Keep-mask for this rank's slice of a dropout layer, independent of the world size.

        The mask of the whole layer is drawn from a generator seeded by (seed, step, layer) and
        sliced, so one process and two ranks drop the same units.
        """
        index, width, cols = self.dropout_slices[stage]
        rng = np.random.default_rng([self.config.train.seed, step, index, 0xD509])
        u = rng.random((batch, width), dtype=np.float32)  # (N, whole layer)
        return u[:, cols] >= self.config.model.dropout  # (N, this rank's units)

    def forward(self, x: np.ndarray, train: bool = True, step: int = 0) -> np.ndarray | None:
        """x (N, I, I, 3) NHWC input -> logits (N, classes) at the coordinator, else None."""
        batch = x.shape[0]
        for name, layer in self.stages:
            t0 = time.perf_counter()
            if isinstance(layer, Dropout):
                keep = self.dropout_mask(name, batch, step) if train else None
                x = layer.forward(x, train=train, keep=keep)
            else:
                x = layer.forward(x, train=train)
            self.timings[name][0] += time.perf_counter() - t0
        return x

    def backward(self, dlogits: np.ndarray | None) -> None:
        """Accumulate every parameter gradient of this rank from the logits gradient."""
        dy = dlogits
        for name, layer in reversed(self.stages):
            t0 = time.perf_counter()
            dy = layer.backward(dy)
            self.timings[name][1] += time.perf_counter() - t0

    def take_timings(self) -> dict[str, list[float]]:
        """Seconds per stage [forward, backward] since the last call; resets them."""
        out = self.timings
        self.timings = {name: [0.0, 0.0] for name, _ in self.stages}
        return out
