"""Communication as layers: each collective is a forward op whose backward is its adjoint.

Two pairs cover the whole 2012 split (the Megatron `mappings.py` idea):

- `GatherChannels`: forward all-gather of the channel halves (every device then runs its own half
  of the weights over the whole input); backward reduce-scatter of the input gradient (each device
  computed a partial gradient for the whole input; the parts are summed and each keeps its own).
- `GatherToRoot`: forward gather of the channel halves at one rank (the logits at the coordinator,
  or fc8's input at device 0 when fc8 lives there); backward scatter of the gradient halves.

A third pair serves Caffe's LRN, whose window runs across the device boundary:

- `ChannelHalo`: forward, each device appends the `halo` channels next to its own from each
  neighbouring device (zeros past the ends); backward, the gradients of those borrowed channels
  are sent back to their owners and added there. `ChannelCrop` drops the borrowed channels again.

On one rank all are identities. Channels are the last axis (NHWC activations, (N, F) features).
"""

from __future__ import annotations

import numpy as np

from .comm import Comm


class GatherChannels:
    """All-gather of channel halves forward, reduce-scatter of the input gradient backward."""

    params: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}

    def __init__(self, comm: Comm, layer: str):
        self.comm, self.layer = comm, layer

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        size = self.comm.size
        if size == 1:
            return x
        parts = self.comm.allgather(np.ascontiguousarray(x), self.layer, "fwd")  # (R, N, ..., c)
        full = np.moveaxis(parts, 0, -2)  # (N, ..., R, c)
        return full.reshape(*x.shape[:-1], size * x.shape[-1])  # (N, ..., R*c) rank order

    def backward(self, dy: np.ndarray) -> np.ndarray:
        size = self.comm.size
        if size == 1:
            return dy
        c_local = dy.shape[-1] // size
        parts = dy.reshape(*dy.shape[:-1], size, c_local)  # (N, ..., R, c)
        parts = np.ascontiguousarray(np.moveaxis(parts, -2, 0))  # (R, N, ..., c)
        return self.comm.reduce_scatter(parts, self.layer, "bwd")  # (N, ..., c) summed

    def zero_grad(self) -> None:
        pass


class GatherToRoot:
    """Gather of channel halves at `root` forward (None elsewhere), scatter of gradients back."""

    params: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}

    def __init__(self, comm: Comm, layer: str, root: int = 0):
        self.comm, self.layer, self.root = comm, layer, root
        self._shape: tuple[int, ...] = ()
        self._dtype = np.float32

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray | None:
        size = self.comm.size
        if size == 1:
            return x
        self._shape, self._dtype = x.shape, x.dtype
        parts = self.comm.gather(np.ascontiguousarray(x), self.layer, "fwd", self.root)
        if parts is None:
            return None
        full = np.moveaxis(parts, 0, -2)  # (N, R, c)
        return full.reshape(*x.shape[:-1], size * x.shape[-1])  # (N, R*c)

    def backward(self, dy: np.ndarray | None) -> np.ndarray:
        size = self.comm.size
        if size == 1:
            return dy
        parts = None
        if self.comm.rank == self.root:
            parts = dy.reshape(*dy.shape[:-1], size, dy.shape[-1] // size)
            parts = np.ascontiguousarray(np.moveaxis(parts, -2, 0))  # (R, N, c)
        return self.comm.scatter(parts, self._shape, self._dtype, self.layer, "bwd", self.root)

    def zero_grad(self) -> None:
        pass


class ChannelHalo:
    """Borrow `halo` channels from each neighbouring device forward; return their gradients."""

    params: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}

    def __init__(self, comm: Comm, layer: str, halo: int):
        self.comm, self.layer, self.halo = comm, layer, halo

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        if self.comm.size == 1:
            return x
        h, c = self.halo, x.shape[-1]
        below = self.comm.shift(np.ascontiguousarray(x[..., c - h:]), +1, self.layer, "fwd")
        above = self.comm.shift(np.ascontiguousarray(x[..., :h]), -1, self.layer, "fwd")
        return np.concatenate([below, x, above], axis=-1)  # (N, H, W, h + c + h)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self.comm.size == 1:
            return dy
        h = self.halo
        c = dy.shape[-1] - 2 * h
        dx = dy[..., h:h + c].copy()  # (N, H, W, c) own channels
        # my upper halo is the next device's first channels: its gradient goes there, and the
        # previous device's upper-halo gradient belongs to my first channels (and mirror-wise)
        dx[..., :h] += self.comm.shift(np.ascontiguousarray(dy[..., h + c:]), +1, self.layer,
                                       "bwd")
        dx[..., c - h:] += self.comm.shift(np.ascontiguousarray(dy[..., :h]), -1, self.layer,
                                           "bwd")
        return dx

    def zero_grad(self) -> None:
        pass


class ChannelCrop:
    """Drop `halo` channels at both ends forward (borrowed by ChannelHalo); zero-pad backward."""

    params: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}

    def __init__(self, halo: int):
        self.halo = halo

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        return np.ascontiguousarray(x[..., self.halo:x.shape[-1] - self.halo])

    def backward(self, dy: np.ndarray) -> np.ndarray:
        pad = [(0, 0)] * (dy.ndim - 1) + [(self.halo, self.halo)]
        return np.pad(dy, pad)

    def zero_grad(self) -> None:
        pass
