"""Presets load, overrides apply, and every bad key or value is named in the error."""

import pytest

from dualgpu_alexnet import config
from dualgpu_alexnet.config import ConfigError

PRESETS = ["alexnet2012", "caffe", "cuda-convnet2", "onegpu-half", "seed", "tiny"]


def test_every_spec_preset_exists():
    assert config.preset_names() == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_saved_toml(name):
    c = config.load(name)
    assert c.model.name == name
    assert config.from_toml_text(c.to_toml()) == c


def test_presets_differ_as_the_spec_table_says():
    paper, ccn2, caffe, seed, half = (config.load(n) for n in
                                      ("alexnet2012", "cuda-convnet2", "caffe", "seed",
                                       "onegpu-half"))
    assert (paper.model.lrn_k, paper.model.lrn_alpha_over_n, paper.model.lrn_scope) == \
        (2.0, False, "device")
    assert paper.model.bias_init == 1.0 and paper.train.batch_size == 128
    assert paper.optim.schedule == "plateau" and paper.optim.plateau_max_drops == 3
    assert ccn2.model.fc8 == "device0" and ccn2.model.lrn_alpha_over_n
    assert ccn2.optim.schedule == "exp_steps" and ccn2.optim.lr == 0.02
    assert (caffe.model.lrn_k, caffe.model.lrn_scope, caffe.model.bias_init) == (1.0, "all", 0.1)
    assert caffe.train.batch_size == 256 and caffe.optim.schedule == "step"
    assert seed.model.lrn_place == "after_pool" and seed.train.batch_size == 2
    assert seed.optim.schedule == "constant"
    assert half.model.devices == 1 and half.model.channels == (48, 128, 192, 192, 256, 4096, 4096)


def test_override_parses_toml_values():
    c = config.load("tiny", ["optim.lr=0.02", "model.fc8=device0", "train.steps=5",
                             "model.dropout_inverted=true"])
    assert (c.optim.lr, c.model.fc8, c.train.steps, c.model.dropout_inverted) == \
        (0.02, "device0", 5, True)


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr"]),
    ("nosuch.key=1", ["nosuch"]),
    ("optim.lr=abc", ["optim.lr", "abc"]),
    ("train.batch_size=1.5", ["train.batch_size", "1.5"]),
    ("model.fc8=half", ["model.fc8", "half"]),
    ("train.batch_size=0", ["train.batch_size", "0"]),
    ("model.channels=[96, 256]", ["model.channels"]),
    ("model.dropout=1.0", ["model.dropout", "1.0"]),
    ("lr=0.1", ["section.key=value"]),
])
def test_bad_override_names_key_and_value(override, words):
    with pytest.raises(ConfigError) as err:
        config.load("tiny", [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*alexnet2012"):
        config.load("nope")


def test_bad_toml_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        config.load(str(bad))


def test_digest_changes_with_any_value():
    assert config.load("tiny").digest() != config.load("tiny", ["train.seed=1"]).digest()


def test_text_values_need_no_quotes_even_when_they_look_like_numbers():
    assert config.load("tiny", ["train.fail_mode=nan"]).train.fail_mode == "nan"
    with pytest.raises(ConfigError, match="train.fail_mode must be one of"):
        config.load("tiny", ["train.fail_mode=1"])
