"""launch.evaluate and launch.predict on a trained tiny checkpoint, on 1 process and 2 ranks."""

import json

import numpy as np
import pytest
from conftest import run_ranks
from PIL import Image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_ranks(["-m", "launch.train", "--config", "tiny", "--steps", "3", "--out", str(run),
                      "--quiet"], n=1, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return run / "checkpoint.npz"


@pytest.mark.timeout(200)
def test_evaluate_gives_the_same_errors_on_one_process_and_two_ranks(trained):
    results = []
    for n in (1, 2):
        proc = run_ranks(["-m", "launch.evaluate", "--checkpoint", str(trained)], n=n,
                         timeout=120)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one, two = results
    assert set(one) == {"center", "ten"} and one["center"]["images"] == 160
    for crops in ("center", "ten"):
        assert one[crops]["top1_err"] == pytest.approx(two[crops]["top1_err"], abs=1e-9)
        assert 0.0 <= one[crops]["top5_err"] <= one[crops]["top1_err"] <= 1.0


@pytest.mark.timeout(200)
def test_predict_logits_of_an_nchw_batch_agree_across_world_sizes(trained, tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 3, 99, 99)).astype(np.float32) * 40
    np.save(tmp_path / "x.npy", x)
    logits = []
    for n in (1, 2):
        out = tmp_path / f"logits{n}.npy"
        proc = run_ranks(["-m", "launch.predict", "--checkpoint", str(trained), "--input",
                          str(tmp_path / "x.npy"), "--output", str(out)], n=n, timeout=120)
        assert proc.returncode == 0, proc.stderr
        logits.append(np.load(out))
    assert logits[0].shape == (3, 10)
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(120)
def test_predict_prints_top5_class_names_of_image_files(trained, tmp_path):
    paths = []
    for i, mode in enumerate(("RGB", "L", "CMYK")):
        path = tmp_path / f"img{i}.jpg"
        Image.new(mode, (150, 120), color=40 * i + 30).save(path)
        paths.append(str(path))
    proc = run_ranks(["-m", "launch.predict", "--checkpoint", str(trained), *paths], n=1,
                     timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == paths
    assert all(line.count("class_") == 5 for line in lines)


@pytest.mark.timeout(120)
def test_predict_names_an_unreadable_image_and_exits_2(trained, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    proc = run_ranks(["-m", "launch.predict", "--checkpoint", str(trained), str(bad)], n=2,
                     timeout=60)
    assert proc.returncode == 2
    assert f"error: {bad}: cannot read the image" in proc.stderr
