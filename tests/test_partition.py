"""The split table reproduces the paper's numbers (SPEC section 1)."""

import pytest

from dualgpu_alexnet import config, partition
from dualgpu_alexnet.partition import GATHERED, LOCAL


@pytest.fixture(scope="module")
def paper():
    return config.load("alexnet2012")


def test_alexnet_has_60965224_parameters(paper):
    assert partition.total_params(paper.model) == 60_965_224


def test_per_device_parameters_are_half(paper):
    per_device = sum(p.params for p in partition.plan(paper.model)) // 2
    assert per_device == 30_482_612


def test_forward_multiply_adds_per_layer(paper):
    macs = {p.name: p.macs for p in partition.plan(paper.model)}
    assert sum(macs.values()) == 724_406_816
    assert macs["conv1"] == 105_415_200 and macs["conv2"] == 223_948_800
    assert macs["fc6"] == 37_748_736


def test_crossing_volumes_per_image(paper):
    crossing = {p.name: p.crossing_floats for p in partition.plan(paper.model)}
    assert crossing == {"conv1": 0, "conv2": 0, "conv3": 21_632, "conv4": 0, "conv5": 0,
                        "fc6": 4_608, "fc7": 2_048, "fc8": 2_048}
    assert sum(crossing.values()) * 4 == 121_344


def test_only_conv3_and_fc_layers_cross():
    assert [s.name for s in partition.ALEXNET if s.input == GATHERED] == \
        ["conv3", "fc6", "fc7", "fc8"]
    assert [s.name for s in partition.ALEXNET if s.input == LOCAL] == ["conv2", "conv4", "conv5"]


def test_conventional_shapes(paper):
    shapes = partition.full_shapes(paper.model)
    assert shapes["conv1.weight"] == (96, 3, 11, 11)
    assert shapes["conv2.weight"] == (256, 48, 5, 5)
    assert shapes["conv3.weight"] == (384, 256, 3, 3)
    assert shapes["conv4.weight"] == (384, 192, 3, 3)
    assert shapes["conv5.weight"] == (256, 192, 3, 3)
    assert shapes["fc6.weight"] == (4096, 9216)
    assert shapes["fc8.weight"] == (1000, 4096) and shapes["fc8.bias"] == (1000,)


def test_spatial_sizes(paper):
    sizes = [(p.name, p.out_hw, p.post_hw) for p in partition.plan(paper.model)][:5]
    assert sizes == [("conv1", 55, 27), ("conv2", 27, 13), ("conv3", 13, 13),
                     ("conv4", 13, 13), ("conv5", 13, 6)]


def test_step_traffic_at_batch_128(paper):
    events = partition.step_transfers(paper, batch=128, world_size=2, rank=1)
    fwd = {(e.layer, e.op): e.nbytes for e in events if e.direction == "fwd"}
    assert fwd[("conv3", "allgather")] == 128 * 21_632 * 4
    moved = sum(e.nbytes for e in events if e.layer != "logits")
    assert moved == 128 * 121_344 * 2  # forward + backward, each way: 31.06 MB
    assert [e.layer for e in events] == ["conv3", "fc6", "fc7", "fc8", "logits",
                                         "logits", "fc8", "fc7", "fc6", "conv3"]


def test_fc8_on_device0_gathers_its_input_there():
    c = config.load("cuda-convnet2")
    p = partition.plan(c.model)[-1]
    assert p.out_slice(0, 2) == slice(0, 1000) and p.out_slice(1, 2) == slice(0, 0)
    events = partition.step_transfers(c, batch=4, world_size=2, rank=1)
    assert [(e.layer, e.op, e.direction) for e in events][3:5] == \
        [("fc8", "gather", "fwd"), ("fc8", "scatter", "bwd")]


def test_world_size_errors_name_the_preset():
    with pytest.raises(ValueError, match="onegpu-half.*1 process only, not on 2 ranks"):
        partition.check_world_size(config.load("onegpu-half"), 2)
    with pytest.raises(ValueError, match="not on 3 ranks"):
        partition.check_world_size(config.load("tiny"), 3)
    partition.check_world_size(config.load("caffe"), 2)
    partition.check_world_size(config.load("caffe"), 1)


def test_caffe_lrn_borrows_two_channels_from_the_other_device():
    caffe = config.load("caffe")
    halos = {p.name: partition.lrn_halo(caffe.model, p) for p in partition.plan(caffe.model)}
    assert halos["conv1"] == (2, 55) and halos["conv2"] == (2, 27) and halos["conv3"] == (0, 0)
    paper = config.load("alexnet2012")
    assert all(partition.lrn_halo(paper.model, p) == (0, 0) for p in partition.plan(paper.model))
    events = partition.step_transfers(caffe, batch=1, world_size=2, rank=0)
    assert [(e.layer, e.nbytes) for e in events[:4]] == [
        ("conv1.lrn", 2 * 55 * 55 * 4), ("conv1.lrn", 0), ("conv2.lrn", 2 * 27 * 27 * 4),
        ("conv2.lrn", 0)]
