"""The whole one-process net: gradient check end to end, shapes, dropout masks, sharding."""

import numpy as np
import pytest

from dualgpu_alexnet import config
from dualgpu_alexnet.comm import world
from dualgpu_alexnet.init import init_full, init_shard, shard
from dualgpu_alexnet.layers import softmax_cross_entropy
from dualgpu_alexnet.model import Net
from dualgpu_alexnet.partition import full_shapes


def _net(preset="tiny", *overrides):
    # paper biases (1) keep ReLUs away from their kink, so central differences are smooth
    cfg = config.load(preset, ["model.dtype=float64", "model.init_std=0.05", "model.bias_init=1.0",
                               *overrides])
    return cfg, Net(cfg, world(), init_shard(cfg.model, 0, 0, 1))


@pytest.mark.parametrize("overrides", [(), ("model.lrn_place=after_pool",),
                                       ("model.fc8=device0", "model.lrn_scope=all"),
                                       ("model.dropout_inverted=true",)])
def test_whole_net_gradient_matches_central_differences(overrides):
    cfg, net = _net("tiny", *overrides)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 99, 99, 3)) * 50
    labels = rng.integers(0, 10, 3)

    def loss():
        return softmax_cross_entropy(net.forward(x, train=True, step=7), labels)[0]

    _, dlogits = softmax_cross_entropy(net.forward(x, train=True, step=7), labels)
    net.backward(dlogits)
    params, grads = net.parameters(), {k: g.copy() for k, g in net.gradients().items()}
    for name in sorted(params):
        w, g = params[name].reshape(-1), grads[name].reshape(-1)
        for i in np.argsort(-np.abs(g))[:2]:  # the largest entries: well above rounding noise
            old, h = w[i], 1e-5
            w[i] = old + h
            up = loss()
            w[i] = old - h
            down = loss()
            w[i] = old
            numeric = (up - down) / (2 * h)
            assert abs(numeric - g[i]) <= 1e-6 * max(abs(numeric), 1e-3), (name, i)


def test_logits_shape_and_train_vs_test_differ():
    cfg, net = _net()
    x = np.random.default_rng(1).standard_normal((2, 99, 99, 3))
    train, test = net.forward(x, train=True, step=0), net.forward(x, train=False)
    assert train.shape == test.shape == (2, 10)
    assert not np.allclose(train, test)


def test_dropout_masks_depend_on_step_not_on_ranks():
    cfg, net = _net()
    a = net.dropout_mask("fc6.dropout", 4, step=3)
    assert a.shape == (4, 128) and 0.3 < a.mean() < 0.7
    assert np.array_equal(a, net.dropout_mask("fc6.dropout", 4, step=3))
    assert not np.array_equal(a, net.dropout_mask("fc6.dropout", 4, step=4))


def test_shards_are_rows_of_the_whole_model():
    cfg = config.load("tiny")
    full = init_full(cfg.model, seed=5)
    assert {k: v.shape for k, v in full.items()} == full_shapes(cfg.model)
    for rank in (0, 1):
        mine = init_shard(cfg.model, 5, rank, 2)
        assert mine.keys() == shard(full, cfg.model, rank, 2).keys()
        rows = slice(rank * 8, rank * 8 + 8)
        assert np.array_equal(mine["conv1.weight"], full["conv1.weight"][rows])
        assert mine["conv2.weight"].shape == (16, 8, 5, 5)


def test_paper_init_biases_and_std():
    cfg = config.load("alexnet2012")
    full = init_full(cfg.model, seed=0)
    assert all(full[f"{n}.bias"].min() == 1 for n in ("conv2", "conv4", "conv5", "fc6", "fc7"))
    assert all(full[f"{n}.bias"].max() == 0 for n in ("conv1", "conv3", "fc8"))
    assert abs(full["fc6.weight"].std() - 0.01) < 1e-4
    assert full["fc6.weight"].dtype == np.float32


def test_one_device_preset_builds_without_groups():
    cfg = config.load("onegpu-half", ["model.input_size=67", "data.image_size=67"])
    net = Net(cfg, world(), init_shard(cfg.model, 0, 0, 1))
    conv2 = dict(net.stages)["conv2"]
    assert conv2.groups == 1 and conv2.params["weight"].shape == (128, 48, 5, 5)
