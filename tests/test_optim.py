"""The paper's SGD rule, bias handling, and every learning-rate schedule in closed form."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest

from dualgpu_alexnet.config import OptimConfig
from dualgpu_alexnet.optim import SGD, LRSchedule, is_bias, sgd_update


def test_sgd_update_matches_hand_computed_two_steps() -> None:
    w = np.array([1.0, -2.0])
    v = np.zeros(2)
    lr, momentum, decay = 0.1, 0.9, 0.01
    sgd_update(w, np.array([0.5, 0.25]), v, lr, momentum, decay)
    # v = -0.01*0.1*w - 0.1*dw = [-0.001 - 0.05, 0.002 - 0.025]
    np.testing.assert_allclose(v, [-0.051, -0.023], rtol=0, atol=1e-15)
    np.testing.assert_allclose(w, [0.949, -2.023], rtol=0, atol=1e-15)
    sgd_update(w, np.array([-1.0, 0.5]), v, lr, momentum, decay)
    # v = 0.9*v - 0.001*w - 0.1*dw = [-0.0459 - 0.000949 + 0.1, -0.0207 + 0.002023 - 0.05]
    np.testing.assert_allclose(v, [0.053151, -0.068677], rtol=0, atol=1e-15)
    np.testing.assert_allclose(w, [1.002151, -2.091677], rtol=0, atol=1e-15)


def _reference(w, dw, v, lr, momentum, decay):
    v = momentum * v - decay * lr * w - lr * dw
    return w + v, v


@pytest.mark.parametrize("size", [1, 65536, 2 * 65536 + 7])
def test_float32_stays_float32_and_matches_float64_across_chunks(size: int) -> None:
    rng = np.random.default_rng(size)
    w = rng.standard_normal(size).astype(np.float32)
    dw = rng.standard_normal(size).astype(np.float32)
    v = rng.standard_normal(size).astype(np.float32)
    w_ref, v_ref = _reference(w.astype(np.float64), dw.astype(np.float64), v.astype(np.float64),
                              0.01, 0.9, 0.0005)
    f32 = np.float32
    v32 = f32(0.9) * v - w * f32(0.0005 * 0.01) - dw * f32(0.01)  # the same ops, in float32
    w32 = w + v32
    sgd_update(w, dw, v, 0.01, 0.9, 0.0005)
    assert w.dtype == np.float32 and v.dtype == np.float32
    np.testing.assert_array_equal(v, v32)
    np.testing.assert_array_equal(w, w32)
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-6)  # float32 rounding of values below 6
    np.testing.assert_allclose(v, v_ref, rtol=0, atol=1e-6)


def test_sgd_update_allocates_no_full_size_temporary() -> None:
    n = 4 << 20  # 16 MiB of float32, like a slice of fc6's weight
    w, dw, v = (np.ones(n, np.float32) for _ in range(3))
    tracemalloc.start()
    sgd_update(w, dw, v, 0.01, 0.9, 0.0005)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, f"peak allocation {peak} bytes during the update"
    assert w[0] == np.float32(1) + v[0]


def test_sgd_update_rejects_mismatch_and_non_contiguous() -> None:
    w = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"fc6.weight: gradient has shape \(3, 2\)"):
        sgd_update(w, np.zeros((3, 2), np.float32), np.zeros_like(w), 0.1, 0.9, 0.0,
                   name="fc6.weight")
    with pytest.raises(ValueError, match="momentum buffer has shape .* dtype float64"):
        sgd_update(w, np.zeros_like(w), np.zeros((2, 3)), 0.1, 0.9, 0.0)
    wt = np.zeros((3, 2), np.float32).T
    with pytest.raises(ValueError, match="C-contiguous"):
        sgd_update(wt, np.zeros_like(wt), np.zeros_like(wt), 0.1, 0.9, 0.0)


def _model(cfg: OptimConfig):
    params = {"fc.weight": np.full((2, 2), 2.0, np.float32), "fc.bias": np.full(2, 2.0, np.float32)}
    grads = {"fc.weight": np.zeros((2, 2), np.float32), "fc.bias": np.ones(2, np.float32)}
    return params, grads, SGD(params, grads, cfg)


def test_is_bias_by_name() -> None:
    assert is_bias("conv1.bias") and is_bias("bias") and not is_bias("conv1.weight")


def test_biases_get_lr_mult_and_no_decay_by_default() -> None:
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.5, bias_lr_mult=2.0)
    params, grads, opt = _model(cfg)
    opt.step(0.1)
    # weight: zero gradient, decay only: w = 2 - 0.5*0.1*2 = 1.9
    np.testing.assert_allclose(params["fc.weight"], 1.9, rtol=1e-6)
    # bias: lr 0.2, no decay: b = 2 - 0.2*1 = 1.8
    np.testing.assert_allclose(params["fc.bias"], 1.8, rtol=1e-6)
    assert params["fc.bias"].dtype == np.float32


def test_decay_biases_decays_biases_at_their_lr() -> None:
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.5, bias_lr_mult=2.0, decay_biases=True)
    params, _, opt = _model(cfg)
    opt.step(0.1)
    # bias: v = -0.5*0.2*2 - 0.2*1 = -0.4
    np.testing.assert_allclose(params["fc.bias"], 1.6, rtol=1e-6)


def test_sgd_state_round_trip_continues_identically() -> None:
    cfg = OptimConfig(momentum=0.9, weight_decay=0.1)
    params, grads, opt = _model(cfg)
    opt.step(0.1)
    state = opt.state_dict()
    assert set(state) == {"fc.weight", "fc.bias"}
    np.testing.assert_allclose(state["fc.bias"], -0.1, rtol=1e-6)
    params2 = {k: v.copy() for k, v in params.items()}
    opt2 = SGD(params2, grads, cfg)
    opt2.load_state_dict({k: v.astype(np.float64) for k, v in state.items()})
    opt.step(0.1)
    opt2.step(0.1)
    for name in params:
        np.testing.assert_array_equal(params[name], params2[name])
        assert opt2.velocity[name].dtype == np.float32
    state["fc.bias"][:] = 123.0  # a copy: the optimizer is unaffected
    assert opt.velocity["fc.bias"][0] != 123.0


def test_sgd_load_state_dict_names_missing_and_misshapen() -> None:
    _, _, opt = _model(OptimConfig())
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]"):
        opt.load_state_dict({"fc.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"fc.bias has shape \(3,\)"):
        opt.load_state_dict({"fc.weight": np.zeros((2, 2)), "fc.bias": np.zeros(3)})
    with pytest.raises(ValueError, match=r"only in grads \['b'\]"):
        SGD({"a": np.zeros(1)}, {"a": np.zeros(1), "b": np.zeros(1)}, OptimConfig())


def _schedule(total: int = 400, **changes) -> LRSchedule:
    return LRSchedule(dataclasses.replace(OptimConfig(), **changes), total)


def test_constant_schedule() -> None:
    s = _schedule(schedule="constant", lr=0.03)
    assert [s.lr(t) for t in (0, 399, 10**6)] == [0.03, 0.03, 0.03]
    assert s.observe(1.0) is False and s.observe(1.0) is False and s.lr(5) == 0.03


def test_step_schedule() -> None:
    s = _schedule(schedule="step", lr=0.01, plateau_factor=0.1, step_every=100)
    assert s.lr(0) == 0.01 and s.lr(99) == 0.01
    assert s.lr(100) == pytest.approx(1e-3, rel=1e-12)
    assert s.lr(250) == pytest.approx(1e-4, rel=1e-12)


def test_exp_steps_schedule_falls_to_lr_over_target_in_num_steps_levels() -> None:
    s = _schedule(total=400, schedule="exp_steps", lr=0.02, exp_target_factor=250.0,
                  exp_num_steps=4)
    levels = [0.02, 0.02 * 250 ** (-1 / 3), 0.02 * 250 ** (-2 / 3), 0.02 / 250]
    # cuda-convnet2: level i covers progress in (i/4, (i+1)/4]
    for step, level in [(0, 0), (100, 0), (101, 1), (200, 1), (201, 2), (300, 2), (301, 3),
                        (400, 3), (10**6, 3)]:
        assert s.lr(step) == pytest.approx(levels[level], rel=1e-12), step
    assert s.lr(400) == pytest.approx(8e-5, rel=1e-12)
    one = _schedule(schedule="exp_steps", lr=0.02, exp_num_steps=1)
    assert one.lr(0) == 0.02 and one.lr(399) == 0.02


def test_plateau_respects_patience_threshold_and_max_drops() -> None:
    s = _schedule(schedule="plateau", lr=0.01, plateau_patience=2, plateau_factor=0.1,
                  plateau_max_drops=2, plateau_threshold=0.01)
    errors = [0.5, 0.495, 0.49, 0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2]
    dropped = [s.observe(e) for e in errors]
    # 0.495 and 0.49 do not beat 0.5 by more than 0.01: the 2nd bad validation drops the lr;
    # 0.3 resets; two more bad ones drop again; 0.2 improves; then no more drops (max 2).
    assert dropped == [False, False, True, False, False, True, False, False, False, False, False]
    assert s.drops == 2 and s.best_error == 0.2
    assert s.lr(0) == pytest.approx(1e-4, rel=1e-12)


def test_plateau_state_round_trip_through_json_continues_exactly() -> None:
    kwargs = dict(schedule="plateau", plateau_patience=3, plateau_max_drops=3)
    s = _schedule(**kwargs)
    assert s.state_dict()["best_error"] is None
    for e in [0.9, 0.8, 0.85, 0.85]:
        s.observe(e)
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"kind": "plateau", "best_error": 0.8, "bad_count": 2, "drops": 0,
                     "factor": 1.0}
    resumed = _schedule(**kwargs)
    resumed.load_state_dict(state)
    assert resumed.observe(0.81) is True and s.observe(0.81) is True
    assert resumed.state_dict() == s.state_dict()
    assert resumed.lr(0) == pytest.approx(0.001, rel=1e-12)
    with pytest.raises(ValueError, match="drops=-1"):
        resumed.load_state_dict({**state, "drops": -1})
    with pytest.raises(ValueError, match="schedule state lacks bad_count"):
        resumed.load_state_dict({"best_error": 0.5, "drops": 1})
    resumed.load_state_dict({})  # a checkpoint without schedule state: start afresh
    assert resumed.state_dict() == _schedule(**kwargs).state_dict()


def test_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
        _schedule(total=0)
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        _schedule(schedule="cosine")
