"""Training learns: `tiny` beats chance clearly on the synthetic default and on real digits.

Both runs use two ranks (the paper split) through the real command line, under a timeout.
Chance is 90% top-1 error on these 10-class sets.
"""

import json

import pytest
from conftest import run_ranks


def _evals(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "eval"]


@pytest.mark.timeout(300)
def test_tiny_learns_the_synthetic_default(tmp_path):
    out = tmp_path / "run"
    proc = run_ranks(["-m", "launch.train", "--config", "tiny", "--steps", "120", "--out",
                      str(out), "--quiet"], n=2, timeout=280)
    assert proc.returncode == 0, proc.stderr
    final = _evals(out)[-1]
    assert final["step"] == 120 and final["images"] == 160
    assert final["top1_err"] < 0.75, final


@pytest.mark.timeout(300)
def test_tiny_learns_real_digits_from_a_prepared_cache(tmp_path):
    folder, cache, out = tmp_path / "digits", tmp_path / "cache", tmp_path / "run"
    made = run_ranks(["-m", "launch.make_demo_data", str(folder)], n=1, timeout=120)
    assert made.returncode == 0, made.stderr
    prepared = run_ranks(["-m", "launch.prepare", str(folder), "--out", str(cache),
                          "--image-size", "112", "--quiet"], n=1, timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    proc = run_ranks(["-m", "launch.train", "--config", "tiny", "--data", str(cache), "--steps",
                      "100", "--set", "train.eval_every=50", "--out", str(out), "--quiet"],
                     n=2, timeout=280)
    assert proc.returncode == 0, proc.stderr
    final = _evals(out)[-1]
    assert final["images"] == 355
    assert final["top1_err"] < 0.75, final
