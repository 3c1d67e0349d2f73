"""The paper's SGD with momentum and weight decay, and the learning-rate schedules of the presets.

Update rule (Krizhevsky et al. 2012, section 5), `dw` the batch-mean gradient:

    v <- momentum * v - weight_decay * lr * w - lr * dw
    w <- w + v
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dualgpu_alexnet.config import OptimConfig

_CHUNK = 1 << 16  # elements per slice of the in-place update: bounds the scratch buffer's size


def _check_same(name: str, w: np.ndarray, other: np.ndarray, what: str) -> None:
    if other.shape != w.shape or other.dtype != w.dtype:
        raise ValueError(f"{name}: {what} has shape {other.shape} dtype {other.dtype}, the "
                         f"parameter has shape {w.shape} dtype {w.dtype}")


def sgd_update(w: np.ndarray, dw: np.ndarray, v: np.ndarray, lr: float, momentum: float,
               weight_decay: float, *, name: str = "param",
               scratch: np.ndarray | None = None) -> None:
    """Apply one step of the paper's rule to `w` and `v` in place, in their own dtype.

    Args:
        w: parameter (C-contiguous, updated in place).
        dw: batch-mean gradient, same shape and dtype (read only).
        v: momentum buffer, same shape and dtype, C-contiguous (updated in place).
        lr: learning rate for this parameter.
        momentum: momentum coefficient.
        weight_decay: L2 coefficient (0 for undecayed parameters).
        name: parameter name for error messages.
        scratch: optional 1-d buffer of w's dtype with at least min(w.size, 65536) elements.
    """
    _check_same(name, w, dw, "gradient")
    _check_same(name, w, v, "momentum buffer")
    if not (w.flags.c_contiguous and w.flags.writeable and v.flags.c_contiguous
            and v.flags.writeable):
        raise ValueError(f"{name}: parameter and momentum buffer must be writeable and "
                         "C-contiguous to be updated in place")
    scalar = w.dtype.type  # keep every product in the parameter's dtype (no float64 temporaries)
    mom, decay, step = scalar(momentum), scalar(weight_decay * lr), scalar(lr)
    w_flat, v_flat, dw_flat = w.reshape(-1), v.reshape(-1), dw.reshape(-1)
    chunk = min(w.size, _CHUNK)
    if scratch is None or scratch.dtype != w.dtype or scratch.size < chunk:
        scratch = np.empty(chunk, dtype=w.dtype)
    for start in range(0, w.size, _CHUNK):
        end = min(start + _CHUNK, w.size)
        wc, vc, tmp = w_flat[start:end], v_flat[start:end], scratch[:end - start]
        vc *= mom  # momentum * v
        if weight_decay:
            np.multiply(wc, decay, out=tmp)
            vc -= tmp  # - weight_decay * lr * w
        np.multiply(dw_flat[start:end], step, out=tmp)
        vc -= tmp  # - lr * dw
        wc += vc


def is_bias(name: str) -> bool:
    """A parameter is a bias if its name ends with "bias" (e.g. "conv1.bias")."""
    return name.endswith("bias")


class SGD:
    """Momentum SGD over named parameters, holding one momentum buffer per parameter."""

    def __init__(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
                 cfg: OptimConfig) -> None:
        """Bind parameters to their gradient arrays; momentum starts at zero.

        Args:
            params: name -> parameter array (updated in place by `step`).
            grads: name -> gradient array (batch mean), the same names, shapes and dtypes.
            cfg: momentum, weight_decay, decay_biases and bias_lr_mult are used.
        """
        if set(params) != set(grads):
            raise ValueError(f"params and grads name different tensors: only in params "
                             f"{sorted(set(params) - set(grads))}, only in grads "
                             f"{sorted(set(grads) - set(params))}")
        for name in params:
            _check_same(name, params[name], grads[name], "gradient")
        self.params = dict(params)
        self.grads = dict(grads)
        self.cfg = cfg
        self.velocity = {name: np.zeros_like(p) for name, p in self.params.items()}
        largest = max((p.size for p in self.params.values()), default=0)
        self._scratch = {dtype: np.empty(min(largest, _CHUNK), dtype=dtype)
                         for dtype in {p.dtype for p in self.params.values()}}

    def hyper(self, name: str, lr: float) -> tuple[float, float]:
        """(learning rate, weight decay) for parameter `name` at base learning rate `lr`."""
        if is_bias(name):
            decay = self.cfg.weight_decay if self.cfg.decay_biases else 0.0
            return lr * self.cfg.bias_lr_mult, decay
        return lr, self.cfg.weight_decay

    def step(self, lr: float) -> None:
        """Update every parameter with its current gradient at base learning rate `lr`."""
        for name, w in self.params.items():
            param_lr, decay = self.hyper(name, lr)
            sgd_update(w, self.grads[name], self.velocity[name], param_lr, self.cfg.momentum,
                       decay, name=name, scratch=self._scratch[w.dtype])

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the momentum buffers, keyed by parameter name."""
        return {name: v.copy() for name, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore momentum buffers saved by `state_dict` (cast to each parameter's dtype)."""
        if set(state) != set(self.velocity):
            raise ValueError(f"momentum state does not match the parameters: missing "
                             f"{sorted(set(self.velocity) - set(state))}, unexpected "
                             f"{sorted(set(state) - set(self.velocity))}")
        for name, value in state.items():
            value = np.asarray(value)
            if value.shape != self.velocity[name].shape:
                raise ValueError(f"momentum for {name} has shape {value.shape}, the parameter "
                                 f"has shape {self.velocity[name].shape}")
        for name, value in state.items():
            np.copyto(self.velocity[name], value, casting="same_kind")


SCHEDULES = ("constant", "plateau", "step", "exp_steps")


class LRSchedule:
    """Learning rate as a function of the step, plus the plateau state driven by validations."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        """Build the schedule named by cfg.schedule.

        Args:
            cfg: lr, schedule and the plateau_*, step_every and exp_* fields.
            total_steps: length of the run in steps (the exp_steps progress is step / total_steps).
        """
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {cfg.schedule!r}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if cfg.plateau_max_drops < 0:
            raise ValueError(f"optim.plateau_max_drops must be >= 0, got {cfg.plateau_max_drops}")
        self.cfg = cfg
        self.kind = cfg.schedule
        self.total_steps = total_steps
        self.best_error = math.inf
        self.bad_count = 0
        self.drops = 0

    @property
    def factor(self) -> float:
        """The plateau multiplier so far: plateau_factor ** drops."""
        return self.cfg.plateau_factor ** self.drops

    def exp_level(self, step: int) -> int:
        """The exp_steps level at `step`, as cuda-convnet2's DiscreteExpLRS picks it.

        Level i covers progress in ((i) / n, (i + 1) / n] (level 0 includes progress 0), with
        progress = step / total_steps clamped to the last level.
        """
        n = self.cfg.exp_num_steps
        level = -(-step * n // self.total_steps) - 1  # ceil(progress * n) - 1, in integers
        return min(max(level, 0), n - 1)

    def lr(self, step: int) -> float:
        """The base learning rate at `step` (0-based).

        Args:
            step: the training step about to be taken.
        Returns:
            constant: lr; plateau: lr * plateau_factor ** drops; step: lr * plateau_factor **
            (step // step_every); exp_steps: lr * exp_target_factor ** (-k / (n - 1)) at level k.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        cfg = self.cfg
        if self.kind == "plateau":
            return cfg.lr * self.factor
        if self.kind == "step":
            return cfg.lr * cfg.plateau_factor ** (step // cfg.step_every)
        if self.kind == "exp_steps" and cfg.exp_num_steps > 1:
            k = self.exp_level(step)
            return cfg.lr * cfg.exp_target_factor ** (-k / (cfg.exp_num_steps - 1))
        return cfg.lr

    def observe(self, val_error: float) -> bool:
        """Record a validation error; for "plateau", divide the lr when it stopped improving.

        Args:
            val_error: the validation error just measured (lower is better).
        Returns:
            True if this observation dropped the learning rate.
        """
        if self.kind != "plateau":
            return False
        if val_error < self.best_error - self.cfg.plateau_threshold:
            self.best_error = float(val_error)
            self.bad_count = 0
            return False
        self.bad_count += 1
        if self.bad_count >= self.cfg.plateau_patience and self.drops < self.cfg.plateau_max_drops:
            self.drops += 1
            self.bad_count = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """JSON-able plateau state (best_error None while nothing was observed)."""
        return {"kind": self.kind,
                "best_error": None if math.isinf(self.best_error) else self.best_error,
                "bad_count": self.bad_count, "drops": self.drops, "factor": self.factor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the plateau state saved by `state_dict`; an empty mapping means a fresh state."""
        if not state:
            self.best_error, self.bad_count, self.drops = math.inf, 0, 0
            return
        missing = [k for k in ("best_error", "bad_count", "drops") if k not in state]
        if missing:
            raise ValueError(f"schedule state lacks {', '.join(missing)}: {dict(state)!r}")
        drops, bad_count = state["drops"], state["bad_count"]
        if not (isinstance(drops, int) and 0 <= drops and isinstance(bad_count, int)
                and bad_count >= 0):
            raise ValueError(f"schedule state has drops={drops!r}, bad_count={bad_count!r}; "
                             "both must be integers >= 0")
        best = state["best_error"]
        self.best_error = math.inf if best is None else float(best)
        self.bad_count = bad_count
        self.drops = drops
