"""A 200-step run under `mpirun -n 2` stays healthy (issue: soak): flat memory after warm-up,
exactly keep_last periodic checkpoints, no temporary files and no processes left behind.

Memory is the coordinator's resident set, `rss_mib` in every step record of metrics.jsonl.
"""

import math

import numpy as np
import pytest
from conftest import run_ranks
from mpi_scripts.jobs import job_tag, metrics, no_leftover_processes  # noqa: F401 (fixtures)

from dualgpu_alexnet import checkpoint as ckpt

STEPS, CHECKPOINT_EVERY, EVAL_EVERY, KEEP_LAST = 200, 25, 50, 3


@pytest.mark.timeout(240)
def test_two_rank_soak_keeps_memory_flat_and_the_run_dir_clean(tmp_path):
    run = tmp_path / "run"
    proc = run_ranks(["-m", "launch.train", "--config", "tiny", "--steps", str(STEPS),
                      "--out", str(run), "--quiet", "--set", "train.batch_size=8",
                      "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                      "--set", f"train.eval_every={EVAL_EVERY}",
                      "--set", f"train.keep_last={KEEP_LAST}"], n=2, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    steps, evals = metrics(run)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [50, 100, 150, 200]
    assert all(math.isfinite(r["loss"]) for r in steps)
    rss = np.array([r["rss_mib"] for r in steps])  # rss[i] is after step i + 1
    growth = rss[STEPS // 2:].max() - rss[49]  # last half vs after warm-up (step 50)
    assert growth < 20, f"coordinator memory grew {growth:.1f} MiB: {rss[::10].round(1)}"

    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.npz", "checkpoints", "config.toml", "metrics.jsonl"]
    assert [s for s, _ in ckpt.periodic_checkpoints(run)] == [150, 175, 200]
    assert sorted(p.name for p in (run / ckpt.PERIODIC_DIR).iterdir()) == [
        "step-00000150.npz", "step-00000175.npz", "step-00000200.npz"]  # nothing else
    assert ckpt.load_checkpoint(run / "checkpoint.npz")[1]["step"] == STEPS
