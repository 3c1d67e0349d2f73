"""The two-device split, as data.

`ALEXNET` is the one table that says, per layer, its geometry and where its input comes from:
the image (given to every device), the device's own channels ("local"), or every device's
channels ("gathered", a cross-device layer). The model builder, the summary, the expected
traffic and the docs all read it; nothing else hard-codes which layers cross.

Sharding rule (Megatron-style): full tensors are defined once in the conventional layout, and a
rank holds the rows (output channels) of the devices it hosts. With `devices` devices on
`world_size` ranks, a rank hosts `devices // world_size` devices: 1 under `mpirun -n 2`, both on
one process, where local layers become grouped convolutions and the collectives are identities.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, ConfigError, ModelConfig

IMAGE, LOCAL, GATHERED = "image", "local", "gathered"
SPLIT, DEVICE0 = "split", "device0"


@dataclass(frozen=True)
class LayerSpec:
    """One row of the split table."""

    name: str
    kind: str  # "conv" or "fc"
    input: str  # IMAGE, LOCAL or GATHERED
    kernel: int = 1
    stride: int = 1
    pad: int = 0
    relu: bool = True
    lrn: bool = False  # local response normalisation (placed by model.lrn_place)
    pool: bool = False  # 3x3 stride-2 max-pooling
    dropout: bool = False


ALEXNET: tuple[LayerSpec, ...] = (
    LayerSpec("conv1", "conv", IMAGE, kernel=11, stride=4, lrn=True, pool=True),
    LayerSpec("conv2", "conv", LOCAL, kernel=5, pad=2, lrn=True, pool=True),
    LayerSpec("conv3", "conv", GATHERED, kernel=3, pad=1),
    LayerSpec("conv4", "conv", LOCAL, kernel=3, pad=1),
    LayerSpec("conv5", "conv", LOCAL, kernel=3, pad=1, pool=True),
    LayerSpec("fc6", "fc", GATHERED, dropout=True),
    LayerSpec("fc7", "fc", GATHERED, dropout=True),
    LayerSpec("fc8", "fc", GATHERED, relu=False),
)
POOL_SIZE, POOL_STRIDE = 3, 2


@dataclass(frozen=True)
class LayerPlan:
    """A layer of the whole model: sizes, shapes and costs, per image."""

    spec: LayerSpec
    c_in: int  # input channels (features for fc) of the whole layer
    c_out: int  # output channels of the whole layer
    groups: int  # weight groups in the whole model (devices for local inputs, else 1)
    owner: str  # SPLIT (output channels split over devices) or DEVICE0 (all on device 0)
    in_hw: int  # input side (1 for fc)
    out_hw: int  # output side before pooling (1 for fc)
    post_hw: int  # output side after pooling
    devices: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def weight_shape(self) -> tuple[int, ...]:
        k = self.spec.kernel
        if self.spec.kind == "conv":
            return (self.c_out, self.c_in // self.groups, k, k)
        return (self.c_out, self.c_in)

    @property
    def params(self) -> int:
        w = 1
        for s in self.weight_shape:
            w *= s
        return w + self.c_out

    @property
    def macs(self) -> int:
        """Forward multiply-adds per image."""
        per_out = (self.c_in // self.groups) * self.spec.kernel ** 2
        return self.out_hw ** 2 * self.c_out * per_out

    @property
    def crossing_floats(self) -> int:
        """Floats one device sends the other per image per direction at this layer's input."""
        if self.spec.input != GATHERED or self.devices == 1:
            return 0
        return self.c_in // self.devices * self.in_hw ** 2

    def out_slice(self, rank: int, world_size: int) -> slice:
        """Output channels (weight rows) held by `rank` of `world_size`; empty if none."""
        if self.owner == DEVICE0:
            return slice(0, self.c_out) if rank == 0 else slice(0, 0)
        width = self.c_out // world_size
        return slice(rank * width, (rank + 1) * width)


def _pooled(hw: int) -> int:
    return (hw - POOL_SIZE) // POOL_STRIDE + 1


def plan(model: ModelConfig) -> list[LayerPlan]:
    """The whole model, layer by layer, from the split table and the model config."""
    widths = list(model.channels) + [model.num_classes]
    plans, c_in, hw = [], 3, model.input_size
    for spec, c_out in zip(ALEXNET, widths, strict=True):
        if spec.kind == "fc" and hw > 1:
            c_in, hw = c_in * hw * hw, 1  # pool5 flattened in (channel, row, column) order
        groups = model.devices if spec.input == LOCAL else 1
        out_hw = (hw + 2 * spec.pad - spec.kernel) // spec.stride + 1
        post_hw = _pooled(out_hw) if spec.pool else out_hw
        owner = DEVICE0 if spec.name == "fc8" and model.fc8 == DEVICE0 else SPLIT
        plans.append(LayerPlan(spec, c_in, c_out, groups, owner, hw, out_hw, post_hw,
                               model.devices))
        c_in, hw = c_out, post_hw
    return plans


def check_world_size(config: Config, world_size: int) -> None:
    """Raise ConfigError unless this preset can run on `world_size` ranks."""
    m = config.model
    if world_size not in (1, m.devices):
        runs_on = ("1 process only" if m.devices == 1 else
                   f"1 process or {m.devices} ranks (mpirun -n {m.devices} python -m ...)")
        raise ConfigError(f"preset {m.name!r} splits the model over model.devices={m.devices} "
                          f"device(s), so it runs on {runs_on}, not on {world_size} ranks")


def total_params(model: ModelConfig) -> int:
    """Parameters of the whole model (60,965,224 for the paper's AlexNet)."""
    return sum(p.params for p in plan(model))


def full_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Conventional tensor names and whole-model shapes: `conv1.weight` (96, 3, 11, 11), ..."""
    shapes = {}
    for p in plan(model):
        shapes[f"{p.name}.weight"] = p.weight_shape
        shapes[f"{p.name}.bias"] = (p.c_out,)
    return shapes


@dataclass(frozen=True)
class Transfer:
    """One communication event of a training step, as the split table predicts it."""

    layer: str
    op: str
    direction: str  # "fwd" or "bwd"
    nbytes: int  # bytes this rank sends


def lrn_halo(model: ModelConfig, p: LayerPlan) -> tuple[int, int]:
    """(channels borrowed from each neighbour, side of the LRN input) at layer p; (0, 0) if none.

    Only an LRN window that runs across all channels (model.lrn_scope = "all", Caffe) reaches
    into the neighbouring device, by lrn_size // 2 channels.
    """
    if not p.spec.lrn or model.lrn_scope != "all" or model.devices == 1:
        return 0, 0
    side = p.out_hw if model.lrn_place == "before_pool" or not p.spec.pool else p.post_hw
    return model.lrn_size // 2, side


def step_transfers(config: Config, batch: int, world_size: int, rank: int,
                   itemsize: int = 4) -> list[Transfer]:
    """The activation traffic one rank sends in one training step, in order.

    Control messages (schedule, flags, metrics) and the batch broadcast are not included.
    """
    if world_size == 1:
        return []
    plans = plan(config.model)
    fwd, bwd = [], []  # bwd: one group of events per layer, replayed in reverse layer order
    for p in plans:
        halo, side = lrn_halo(config.model, p)
        if halo:  # shift up (to rank + 1), then down (to rank - 1); the same order backward
            part = batch * halo * side ** 2 * itemsize
            up, down = (part if rank + 1 < world_size else 0), (part if rank > 0 else 0)
            fwd += [Transfer(f"{p.name}.lrn", "shift", "fwd", n) for n in (up, down)]
            bwd.append([Transfer(f"{p.name}.lrn", "shift", "bwd", n) for n in (up, down)])
        if p.spec.input != GATHERED:
            continue
        half = batch * p.c_in // world_size * p.in_hw ** 2 * itemsize
        if p.owner == DEVICE0:
            fwd.append(Transfer(p.name, "gather", "fwd", 0 if rank == 0 else half))
            bwd.append([Transfer(p.name, "scatter", "bwd", half if rank == 0 else 0)])
        else:
            fwd.append(Transfer(p.name, "allgather", "fwd", half * (world_size - 1)))
            bwd.append([Transfer(p.name, "reduce_scatter", "bwd", half * (world_size - 1))])
    last = plans[-1]
    if last.owner == SPLIT:
        part = batch * last.c_out // world_size * itemsize
        fwd.append(Transfer("logits", "gather", "fwd", 0 if rank == 0 else part))
        bwd.append([Transfer("logits", "scatter", "bwd", part * (world_size - 1)
                             if rank == 0 else 0)])
    return fwd + [event for group in bwd[::-1] for event in group]
