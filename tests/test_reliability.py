"""Reliability of `launch.train` on 1 process and under `mpirun -n 2` (issues: two ranks, exact
resume, portable checkpoints, faults, signals, bad input).

Every run is a subprocess of `python -m launch.train --config tiny` with a timeout; the faults are
injected with train.fail_at_step / fail_on_rank / fail_mode. After each test no process it
started may still be alive (mpi_scripts/jobs.py).
"""

import os
import shutil
import signal
import struct
import time
import zipfile

import numpy as np
import pytest
from conftest import run_ranks
from mpi_scripts.jobs import (  # noqa: F401 (job_tag, no_leftover_processes: autouse fixtures)
    MARKER,
    job_tag,
    line_count,
    metrics,
    no_leftover_processes,
    snapshot,
    start,
    tagged_pids,
)

from dualgpu_alexnet import checkpoint as ckpt
from dualgpu_alexnet import config
from dualgpu_alexnet.partition import full_shapes

TRAIN = ["-m", "launch.train", "--config", "tiny"]
HEADER = "dualgpu_alexnet | preset tiny |"
# dropout, augmentation and the plateau schedule are tiny's defaults; validating every 2 steps
# with patience 1 and a threshold no improvement beats, the lr drops at step 4's validation, so
# the plateau state (best error, counters, drops) must survive a resume to repeat the run
STRAIGHT = ["--set", "train.eval_every=2", "--set", "optim.plateau_patience=1",
            "--set", "optim.plateau_threshold=1.0", "--set", "train.checkpoint_every=2",
            "--set", "train.keep_last=2"]
LRS = [0.02] * 4 + [0.002] * 2  # steps 1..6


def train(args: list[str], n: int, timeout: float = 120):
    return run_ranks(["-m", "launch.train", *args], n=n, timeout=timeout)


def one_error(proc, code: int = 2) -> str:
    """The run failed with `code` and printed exactly one `error:` line (returned), no traceback."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def periodic_steps(run) -> list[int]:
    return [step for step, _ in ckpt.periodic_checkpoints(run)]


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """Six straight steps on 1 process and on 2 ranks: {n: (run dir, completed process)}."""
    runs = {}
    for n in (1, 2):
        run = tmp_path_factory.mktemp(f"straight{n}") / "run"
        proc = train(["--config", "tiny", "--steps", "6", "--out", str(run), *STRAIGHT], n=n)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[n] = (run, proc)
    return runs


# -- two ranks ---------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_two_ranks_print_once_and_save_the_whole_model(six_steps):
    run, proc = six_steps[2]
    assert proc.stdout.count(HEADER) == 1
    assert "2 ranks, one device each" in proc.stdout
    for step in range(1, 7):
        assert proc.stdout.count(f"step {step:>6}/6 |") == 1
    assert proc.stdout.count("done: 6 steps") == 1
    tensors, meta = ckpt.load_checkpoint(run / "checkpoint.npz")
    shapes = full_shapes(config.load("tiny").model)
    assert {k: tensors[k].shape for k in shapes} == shapes  # whole tensors, not one rank's rows
    assert {k: tensors["momentum." + k].shape for k in shapes} == shapes
    assert meta["world_size"] == 2 and meta["step"] == 6
    steps, _ = metrics(run)
    comm_mb = [r["comm_mb"] for r in steps]  # every step moves the same activations
    assert comm_mb[0] > 0.5 and max(comm_mb) - min(comm_mb) < 1e-3, comm_mb


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 2])
def test_periodic_checkpoints_rotate(six_steps, n):
    run, _ = six_steps[n]
    assert periodic_steps(run) == [4, 6]  # saved at 2, 4, 6; keep_last=2
    assert ckpt.load_checkpoint(run / "checkpoint.npz")[1]["step"] == 6
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# -- exact resume and portability --------------------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 2])
def test_resume_repeats_a_straight_run_exactly(six_steps, tmp_path, n):
    straight, _ = six_steps[n]
    run = tmp_path / "run"
    first = train(["--config", "tiny", "--steps", "3", "--out", str(run), "--quiet", *STRAIGHT], n)
    assert first.returncode == 0, first.stdout + first.stderr
    assert periodic_steps(run) == [2, 3]
    second = train(["--resume", str(run), "--steps", "6", "--quiet"], n)
    assert second.returncode == 0, second.stdout + second.stderr

    saved = config.from_toml_text((run / "config.toml").read_text())
    assert saved.model.dropout == 0.5 and saved.data.random_crop and saved.data.flip
    assert saved.data.color_noise > 0 and saved.optim.schedule == "plateau"
    want, _ = metrics(straight)
    got, _ = metrics(run)
    assert [r["lr"] for r in want] == LRS  # the plateau drop happened
    assert [(r["step"], r["loss"], r["lr"]) for r in got] == \
        [(r["step"], r["loss"], r["lr"]) for r in want]
    a, meta_a = ckpt.load_checkpoint(straight / "checkpoint.npz")
    b, meta_b = ckpt.load_checkpoint(run / "checkpoint.npz")
    assert sorted(a) == sorted(b) and any(k.startswith("momentum.") for k in a)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert meta_a["schedule_json"] == meta_b["schedule_json"] and meta_b["step"] == 6
    assert periodic_steps(run) == [4, 6]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("src", "dst"), [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_the_other_world_size(six_steps, tmp_path, src, dst):
    straight, _ = six_steps[src]
    run = tmp_path / "run"  # a run directory holding the straight run's step-4 checkpoint
    run.mkdir()
    shutil.copy(straight / "config.toml", run / "config.toml")
    shutil.copy(straight / ckpt.PERIODIC_DIR / "step-00000004.npz", run / ckpt.LATEST_NAME)
    proc = train(["--resume", str(run), "--steps", "6", "--quiet"], dst)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got, _ = metrics(run)
    want, _ = metrics(straight)
    assert [r["step"] for r in got] == [5, 6] and [r["lr"] for r in got] == LRS[4:]
    for g, w in zip(got, want[4:], strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)
    a, _ = ckpt.load_checkpoint(straight / "checkpoint.npz")
    b, meta = ckpt.load_checkpoint(run / "checkpoint.npz")
    assert meta["world_size"] == dst and meta["step"] == 6
    for key in full_shapes(config.load("tiny").model):
        assert max_rel(a[key], b[key]) < 1e-4, key
        assert max_rel(a["momentum." + key], b["momentum." + key]) < 1e-3, key


# -- faults ------------------------------------------------------------------------------------

def run_fault(tmp_path, rank: int, mode: str, *extra: str):
    """2 ranks, a fault at step index 2; returns (job, exit code, seconds from step 1's record
    to the exit, run dir). Without the fault the job would run 1000 steps."""
    run = tmp_path / "run"
    job = start([*TRAIN, "--quiet", "--steps", "1000", "--out", str(run),
                 "--set", "train.fail_at_step=2", "--set", f"train.fail_on_rank={rank}",
                 "--set", f'train.fail_mode="{mode}"', *extra], n=2, log_dir=tmp_path / "log")
    # quoted: unquoted `nan` parses as a TOML float (see the report on config.parse_override)
    after_step1 = job.wait_until(lambda: line_count(run / "metrics.jsonl") >= 1, timeout=60)
    code = job.wait(timeout=60)
    return job, code, time.monotonic() - after_step1, run


@pytest.mark.timeout(90)
@pytest.mark.parametrize("rank", [0, 1])
def test_exception_on_one_rank_ends_the_job_with_one_traceback(tmp_path, rank):
    job, code, seconds, _ = run_fault(tmp_path, rank, "raise")
    assert code != 0 and seconds < 10
    err = job.stderr
    assert err.count(f"[rank {rank}] failed, ending the job:") == 1, err
    assert err.count("Traceback (most recent call last)") == 1, err
    assert err.count(f"RuntimeError: injected fault at step 2 on rank {rank}") == 1, err
    assert f"[rank {1 - rank}]" not in err


@pytest.mark.timeout(90)
def test_rank_dying_abruptly_ends_the_job(tmp_path):
    job, code, seconds, _ = run_fault(tmp_path, 1, "exit")
    assert code != 0 and seconds < 10, job.stderr


@pytest.mark.timeout(90)
def test_hung_rank_is_ended_by_the_other_ranks_watchdog(tmp_path):
    job, code, seconds, _ = run_fault(tmp_path, 1, "hang", "--set", "comm.watchdog_seconds=3")
    assert code != 0 and 3 <= seconds < 12, (seconds, job.stderr)
    lines = [line for line in job.stderr.splitlines() if "watchdog:" in line]
    assert len(lines) == 1, job.stderr
    # rank 0 is blocked in the step's first collectives that need rank 1 (which one depends on
    # the MPI's eager-send size), at step index 2
    assert lines[0].startswith("[rank 0] watchdog: bcast at ")
    assert " at schedule (ctl, step 2)" in lines[0] or " at batch (ctl, step 2)" in lines[0]
    assert "> comm.watchdog_seconds=3; another rank is stuck or gone" in lines[0]


@pytest.mark.timeout(90)
def test_nan_gradient_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    job, code, _, run = run_fault(tmp_path, 1, "nan", "--set", "train.checkpoint_every=1")
    assert code == 3, job.stderr
    assert job.stderr.count("error: ") == 1
    assert ("error: non-finite values in the gradients of fc7 at step 3; stopped every rank "
            "without saving (the last checkpoint is intact)") in job.stderr
    tensors, meta = ckpt.load_checkpoint(run / "checkpoint.npz")  # checksum verified
    assert meta["step"] == 2 and all(np.isfinite(v).all() for v in tensors.values())
    assert periodic_steps(run) == [1, 2]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.timeout(90)
def test_huge_learning_rate_ends_with_a_non_finite_error(tmp_path):
    proc = train(["--config", "tiny", "--steps", "20", "--quiet", "--out", str(tmp_path / "run"),
                  "--set", "optim.lr=1e12"], n=2, timeout=60)
    error = one_error(proc, code=3)
    assert error.startswith(("error: non-finite values in the loss at step ",
                             "error: non-finite values in the gradients of ")), error


# -- signals -----------------------------------------------------------------------------------

@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_a_step_boundary_saves_and_resumes(tmp_path, sig):
    run = tmp_path / "run"
    job = start([*TRAIN, "--steps", "100000", "--out", str(run)], n=2, log_dir=tmp_path / "log")
    job.wait_until(lambda: line_count(run / "metrics.jsonl") >= 1, timeout=60)
    job.proc.send_signal(sig)  # to mpirun, which forwards it to both ranks
    sent = time.monotonic()
    assert job.wait(timeout=60) == 130, job.stderr
    assert time.monotonic() - sent < 10
    steps, _ = metrics(run)
    k = len(steps)
    assert [r["step"] for r in steps] == list(range(1, k + 1))
    assert job.stdout.count("Resume with:") == 1, job.stdout
    assert (f"stopped by {sig.name} at step {k}; saved {run / 'checkpoint.npz'}. Resume with: "
            f"mpirun -n 2 python -m launch.train --resume {run}") in job.stdout
    assert ckpt.load_checkpoint(run / "checkpoint.npz")[1]["step"] == k
    assert periodic_steps(run) == [k]

    proc = train(["--resume", str(run), "--steps", str(k + 1)], n=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"resuming {run}") == 1
    assert [r["step"] for r in metrics(run)[0]] == list(range(1, k + 2))
    assert ckpt.load_checkpoint(run / "checkpoint.npz")[1]["step"] == k + 1


# -- bad input: exit 2, one message naming the problem, nothing created or changed ------------

BAD_SETTINGS = {
    "unknown-key": (["--set", "optim.lrr=1"], "error: unknown config key optim.lrr (value 1)"),
    "ill-typed": (["--set", "optim.lr=fast"], "error: optim.lr must be a number, got 'fast'"),
    "zero-steps": (["--steps", "0"], "error: --steps must be >= 1, got 0"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_setting_is_refused(tmp_path, case, n):
    args, message = BAD_SETTINGS[case]
    proc = train(["--config", "tiny", "--out", str(tmp_path / "run"), *args], n=n, timeout=60)
    assert one_error(proc) == message
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_data_folder_is_refused(tmp_path, case):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    proc = train(["--config", "tiny", "--out", str(tmp_path / "run"), "--data", str(data)], n=1)
    expected = (f"error: {data}: no such file or folder" if case == "missing"
                else f"error: {data / 'train'}: missing")
    assert one_error(proc).startswith(expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_world_size_the_preset_cannot_use_is_refused(tmp_path):
    proc = train(["--config", "onegpu-half", "--out", str(tmp_path / "run")], n=2, timeout=60)
    error = one_error(proc)
    assert "preset 'onegpu-half'" in error and "2 ranks" in error, error
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 2])
def test_truncated_init_checkpoint_is_refused(six_steps, tmp_path, n):
    bad = tmp_path / "truncated.npz"
    data = (six_steps[1][0] / "checkpoint.npz").read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    proc = train(["--config", "tiny", "--init", str(bad), "--out", str(tmp_path / "run")], n=n)
    assert one_error(proc).startswith(f"error: {bad}: corrupt or truncated checkpoint")
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(180)
def test_checkpoint_of_another_preset_is_refused_naming_tensor_and_shapes(six_steps, tmp_path):
    tiny = six_steps[1][0] / "checkpoint.npz"
    proc = train(["--config", "seed", "--init", str(tiny), "--out", str(tmp_path / "run")], n=1)
    error = one_error(proc)
    assert error.startswith(f"error: {tiny}: ")
    assert "conv1.weight has shape (16, 3, 11, 11), the model expects (96, 3, 11, 11)" in error
    assert not (tmp_path / "run").exists()


def _flip_byte_in(path, member: str) -> None:
    """Flip one bit in the middle of `member`'s bytes inside the .npz (zip) file."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                   info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _edit_one_weight(path) -> None:
    """Rewrite the .npz with one weight changed and the stored checksum kept."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["conv1.weight"].flat[0] += 1.0
    np.savez(path, **arrays)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("damage", ["flipped-byte", "edited"])
def test_damaged_checkpoint_is_refused_on_resume(six_steps, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(six_steps[1][0], run)
    latest = run / "checkpoint.npz"
    latest.unlink()  # it is a hard link to the periodic file: damage a copy of its own
    shutil.copy(run / ckpt.PERIODIC_DIR / "step-00000006.npz", latest)
    if damage == "flipped-byte":
        _flip_byte_in(latest, "conv1.weight.npy")
    else:
        _edit_one_weight(latest)
    before = snapshot(run)
    proc = train(["--resume", str(run), "--steps", "8"], n=1)
    error = one_error(proc)
    if damage == "flipped-byte":  # the zip's CRC-32 of the member catches it first
        assert error.startswith(f"error: {latest}: corrupt") and "CRC" in error, error
    else:
        assert error.startswith(f"error: {latest}: checksum mismatch"), error
    assert snapshot(run) == before


@pytest.mark.timeout(180)
def test_out_folder_holding_a_run_is_refused_and_left_unchanged(six_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(six_steps[1][0], run)
    before = snapshot(run)
    proc = train(["--config", "tiny", "--steps", "1", "--out", str(run)], n=1)
    assert one_error(proc).startswith(f"error: {run} already holds a run")
    assert snapshot(run) == before


def _rank_pid(tag: str, rank: int) -> int:
    """The pid of the python process that is MPI rank `rank` of the job tagged `tag`."""
    for pid in tagged_pids(tag):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ and b"launch.train" in cmdline:
            return pid
    raise AssertionError(f"no process is rank {rank}")


@pytest.mark.timeout(120)
def test_rank_killed_with_sigkill_ends_the_whole_job(tmp_path):
    run = tmp_path / "run"
    job = start([*TRAIN, "--steps", "100000", "--out", str(run)], n=2, log_dir=tmp_path / "log")
    job.wait_until(lambda: line_count(run / "metrics.jsonl") >= 1, timeout=60)
    os.kill(_rank_pid(os.environ[MARKER], 1), signal.SIGKILL)  # MARKER: this module's tag
    killed = time.monotonic()
    assert job.wait(timeout=30) != 0
    assert time.monotonic() - killed < 10
