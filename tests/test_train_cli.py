"""One-process training through `python -m launch.train` (issue: a run directory, --init).

Every run is a subprocess of `python -m launch.train --config tiny` under a timeout; the run
directory it leaves is read back as a user would: config.toml, metrics.jsonl, checkpoint.npz.
"""

import math
import tomllib

import numpy as np
import pytest
from conftest import run_ranks
from mpi_scripts.jobs import job_tag, metrics, no_leftover_processes  # noqa: F401 (fixtures)

from dualgpu_alexnet.checkpoint import load_checkpoint

TRAIN = ["-m", "launch.train", "--config", "tiny"]

# tiny's whole model: 99x99 input, conv widths 16/32/48/48/32, fc 128/128, 10 classes; conv2,
# conv4 and conv5 see one device's half of the channels; fc6 sees pool5 flattened, 32 x 2 x 2.
TINY_SHAPES = {
    "conv1.weight": (16, 3, 11, 11), "conv1.bias": (16,),
    "conv2.weight": (32, 8, 5, 5), "conv2.bias": (32,),
    "conv3.weight": (48, 32, 3, 3), "conv3.bias": (48,),
    "conv4.weight": (48, 24, 3, 3), "conv4.bias": (48,),
    "conv5.weight": (32, 24, 3, 3), "conv5.bias": (32,),
    "fc6.weight": (128, 128), "fc6.bias": (128,),
    "fc7.weight": (128, 128), "fc7.bias": (128,),
    "fc8.weight": (10, 128), "fc8.bias": (10,),
}


def train(*args: str, timeout: float = 120):
    return run_ranks([*TRAIN, *args], n=1, timeout=timeout)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = train("--steps", "2", "--out", str(run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, proc


@pytest.mark.timeout(120)
def test_run_directory_holds_config_metrics_and_checkpoint(two_steps):
    run, proc = two_steps
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.npz", "checkpoints", "config.toml", "metrics.jsonl"]
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["model"]["name"] == "tiny" and saved["model"]["input_size"] == 99
    assert saved["train"]["batch_size"] == 32
    steps, evals = metrics(run)
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        for key in ("loss", "lr", "images_per_s", "comm_mb", "data_wait"):
            assert math.isfinite(record[key]), (key, record)
        assert record["lr"] == 0.02 and record["comm_mb"] == 0.0  # one process moves nothing
        assert 0 < record["loss"] < 10 and record["images_per_s"] > 0
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["images"] == 160
    assert 0 <= evals[0]["top1_err"] <= 1 and 0 <= evals[0]["top5_err"] <= evals[0]["top1_err"]
    assert proc.stdout.count("done: 2 steps") == 1


@pytest.mark.timeout(120)
def test_checkpoint_uses_conventional_names_and_tiny_shapes(two_steps):
    run, _ = two_steps
    tensors, meta = load_checkpoint(run / "checkpoint.npz")  # verifies the checksum
    model = {k: v.shape for k, v in tensors.items() if k.endswith((".weight", ".bias"))
             and not k.startswith("momentum.")}
    assert model == TINY_SHAPES
    momentum = {k.removeprefix("momentum."): v.shape for k, v in tensors.items()
                if k.startswith("momentum.")}
    assert momentum == TINY_SHAPES
    assert all(tensors[k].dtype == np.float32 for k in TINY_SHAPES)
    assert meta["step"] == 2 and meta["total_steps"] == 2 and meta["world_size"] == 1
    assert 'name = "tiny"' in meta["config"]


@pytest.mark.timeout(120)
def test_init_starts_from_the_file_and_accepts_converted_weights(two_steps, tmp_path):
    """A step at lr 1e-30 moves no float32 weight, so the run's checkpoint shows what it started
    from; a plain np.savez of `<layer>.weight/.bias` (Caffe/PyTorch converted) starts the same."""
    run, _ = two_steps
    source, _ = load_checkpoint(run / "checkpoint.npz")
    plain = tmp_path / "converted.npz"
    np.savez(plain, **{name: source[name] for name in TINY_SHAPES})
    losses = {}
    for name, init in (("ours", run / "checkpoint.npz"), ("plain", plain)):
        out = tmp_path / name
        proc = train("--steps", "1", "--init", str(init), "--out", str(out), "--quiet",
                     "--set", "optim.lr=1e-30")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        after, meta = load_checkpoint(out / "checkpoint.npz")
        assert meta["step"] == 1
        for key in TINY_SHAPES:
            np.testing.assert_allclose(after[key], source[key], rtol=1e-6, atol=0, err_msg=key)
        losses[name] = metrics(out)[0][0]["loss"]
    fresh = metrics(run)[0][0]["loss"]  # step 1 of the fixture: the seed's own init, same batch
    assert losses["ours"] == losses["plain"] != fresh
