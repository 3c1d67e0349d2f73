"""Checkpoints: round trip, atomic writes under crashes, corruption errors, shapes, rotation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dualgpu_alexnet import checkpoint as ckpt
from dualgpu_alexnet.checkpoint import (
    CheckpointError,
    CheckpointManager,
    check_shapes,
    latest,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"conv1.weight": (4, 3, 3, 3), "conv1.bias": (4,), "fc8.weight": (5, 4), "fc8.bias": (5,)}


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    tensors.update({f"momentum.{name}": np.zeros(shape, np.float32)
                    for name, shape in SHAPES.items()})
    tensors["rng.mt19937"] = np.random.MT19937(seed).state["state"]["key"]  # (624,) uint32
    tensors["data.order"] = rng.permutation(10).astype(np.int64)
    tensors["eval.f64"] = rng.standard_normal((2, 3))
    tensors["eval.fortran"] = np.asfortranarray(rng.standard_normal((3, 2)))
    return tensors


def _meta(step: int = 7) -> dict:
    return {"step": np.int64(step), "config_toml": '[optim]\nlr = 0.01\n', "world_size": 2,
            "schedule": {"best_error": None, "bad_count": 1, "drops": 0},
            "rng": {"bit_generator": "PCG64", "state": {"state": 2**100, "inc": 3}},
            "data_position": {"epoch": 1, "index": np.int32(256)}, "val_error": np.float32(0.5)}


def _temps(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.tmp"))


def test_round_trip_keeps_names_dtypes_values_and_meta(tmp_path) -> None:
    path = tmp_path / "ckpt.npz"
    tensors = _tensors()
    save_checkpoint(path, tensors, _meta())
    loaded, meta = load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype, name
        np.testing.assert_array_equal(loaded[name], array)
    assert loaded["rng.mt19937"].dtype == np.uint32 and loaded["rng.mt19937"].shape == (624,)
    assert meta == {"step": 7, "config_toml": '[optim]\nlr = 0.01\n', "world_size": 2,
                    "schedule": {"best_error": None, "bad_count": 1, "drops": 0},
                    "rng": {"bit_generator": "PCG64", "state": {"state": 2**100, "inc": 3}},
                    "data_position": {"epoch": 1, "index": 256}, "val_error": 0.5,
                    "format_version": ckpt.FORMAT_VERSION}
    with np.load(path, allow_pickle=False) as raw:  # plain numpy reads every key
        assert raw["meta.json"].shape == () and raw["meta.json"].dtype.kind == "U"
        assert raw["meta.sha256"].item() == ckpt.tensor_checksum(
            {k: raw[k] for k in raw.files if k != "meta.sha256"})
    assert _temps(tmp_path) == []


def test_save_rejects_object_arrays_and_reserved_names(tmp_path) -> None:
    path = tmp_path / "ckpt.npz"
    with pytest.raises(CheckpointError, match="tensor bad has dtype object"):
        save_checkpoint(path, {"bad": np.array([{}, 1], dtype=object)}, {})
    with pytest.raises(CheckpointError, match="'meta.extra' uses the reserved prefix"):
        save_checkpoint(path, {"meta.extra": np.zeros(1)}, {})
    assert not path.exists() and _temps(tmp_path) == []


def _crashing(real, written: list):
    def crash(*args, **kwargs):
        written.append(args[0])
        if hasattr(args[0], "write"):
            args[0].write(b"PK\x03\x04 half a checkpoint")
        raise OSError("simulated crash")
    return crash


@pytest.mark.parametrize("where", ["savez", "replace", "fsync"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where) -> None:
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _tensors(1), _meta(1))
    written: list = []
    target = {"savez": (np, "savez"), "replace": (os, "replace"), "fsync": (os, "fsync")}[where]
    monkeypatch.setattr(*target, _crashing(getattr(*target), written))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, _tensors(2), _meta(2))
    monkeypatch.undo()
    assert written, "the crash was not reached"
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 1
    np.testing.assert_array_equal(tensors["conv1.weight"], _tensors(1)["conv1.weight"])
    assert _temps(tmp_path) == []


_WRITER = """
import sys
import numpy as np
from dualgpu_alexnet.checkpoint import CheckpointManager
manager = CheckpointManager(sys.argv[1], keep_last=2)
big = np.random.default_rng(0).standard_normal(6_000_000).astype(np.float32)  # 24 MB
step = int(sys.argv[2])
while True:
    step += 1
    big[0] = step
    manager.save(step, {"fc6.weight": big}, {"note": "stress"})
    print(step, flush=True)
"""


def test_sigkill_during_saves_leaves_latest_loadable(tmp_path) -> None:
    """Kill a process that saves checkpoints in a loop: checkpoint.npz always loads."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(0)
    saw_temp, step, attempts = False, 0, 0
    while attempts < 3 or (not saw_temp and attempts < 12):
        attempts += 1
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(run_dir), str(step)],
                                 stdout=subprocess.PIPE, env=env, text=True)
        try:
            first = child.stdout.readline()  # one complete save, so there is a previous file
            assert first.strip(), "the writer died before its first save"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        saw_temp |= bool(_temps(run_dir))
        path = latest(run_dir)
        assert path == run_dir / "checkpoint.npz"
        tensors, meta = load_checkpoint(path)
        assert meta["step"] == int(tensors["fc6.weight"][0]) >= int(first)
        for _, periodic in ckpt.periodic_checkpoints(run_dir):
            load_checkpoint(periodic)
        step = meta["step"] + 100
        CheckpointManager(run_dir, keep_last=2)  # a restart removes what the kill left
        assert _temps(run_dir) == []
    assert saw_temp, f"no kill hit a write in {attempts} attempts"


def _damaged(tmp_path: Path, keep: float) -> Path:
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _tensors(), _meta())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_file_error_names_the_path(tmp_path, keep) -> None:
    path = _damaged(tmp_path, keep)
    with pytest.raises(CheckpointError, match=f"^{path}: .*(truncated|not an .npz)"):
        load_checkpoint(path)


def test_flipped_byte_is_detected(tmp_path) -> None:
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _tensors(), _meta())
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{path}: (corrupt|checksum mismatch)"):
        load_checkpoint(path)


def test_edited_tensor_fails_the_checksum(tmp_path) -> None:
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _tensors(), _meta())
    with np.load(path, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    arrays["fc8.bias"][0] += 1.0  # a well-formed zip whose content no longer matches
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=f"^{path}: checksum mismatch: meta.sha256 says"):
        load_checkpoint(path)


def test_converted_file_without_meta_needs_require_checksum_false(tmp_path) -> None:
    path = tmp_path / "bvlc_alexnet.npz"
    weights = {name: np.ones(shape, np.float32) for name, shape in SHAPES.items()}
    np.savez(path, **weights)
    with pytest.raises(CheckpointError, match="has no meta.sha256.*require_checksum=False"):
        load_checkpoint(path)
    tensors, meta = load_checkpoint(path, require_checksum=False)
    assert meta == {} and set(tensors) == set(SHAPES)
    check_shapes(tensors, SHAPES, path)


def test_other_unreadable_files_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError, match=f"^{missing}: no such checkpoint file"):
        load_checkpoint(missing)
    text = tmp_path / "text.npz"
    text.write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match=f"^{text}: not an .npz"):
        load_checkpoint(text)
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(CheckpointError, match=f"^{single}: is a single .npy array"):
        load_checkpoint(single)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=f"^{pickled}: holds object arrays"):
        load_checkpoint(pickled, require_checksum=False)


def test_check_shapes_names_tensor_and_both_shapes() -> None:
    tensors = {"conv2.weight": np.zeros((256, 48, 5, 5), np.float32)}
    with pytest.raises(CheckpointError) as info:
        check_shapes(tensors, {"conv2.weight": (32, 8, 5, 5)}, "ckpt.npz")
    assert str(info.value) == ("ckpt.npz: conv2.weight has shape (256, 48, 5, 5), "
                               "the model expects (32, 8, 5, 5)")


def test_check_shapes_reports_missing_extra_and_momentum() -> None:
    tensors = _tensors()
    check_shapes(tensors, SHAPES, "ok.npz")  # rng.*, data.*, eval.* are not model keys
    del tensors["fc8.bias"]
    tensors["fc9.weight"] = np.zeros((2, 5), np.float32)
    tensors["momentum.conv1.bias"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as info:
        check_shapes(tensors, SHAPES, "other.npz")
    message = str(info.value)
    assert message.startswith("other.npz: missing fc8.bias (the model expects them)")
    assert "fc9.weight (2, 5) is not in the model" in message
    assert "momentum.conv1.bias has shape (3,), the model expects (4,)" in message


def test_manager_rotates_and_publishes_the_latest(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert latest(tmp_path) is None
    for step in (10, 20, 30, 40):
        path = manager.save(step, _tensors(step), {"world_size": 1})
        assert path == tmp_path / "checkpoints" / f"step-{step:08d}.npz"
    kept = [step for step, _ in ckpt.periodic_checkpoints(tmp_path)]
    assert kept == [30, 40]
    assert latest(tmp_path) == CheckpointManager.latest(tmp_path) == tmp_path / "checkpoint.npz"
    tensors, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["step"] == 40 and meta["world_size"] == 1
    np.testing.assert_array_equal(tensors["conv1.weight"], _tensors(40)["conv1.weight"])
    assert os.path.samefile(tmp_path / "checkpoint.npz", path)  # a hard link, not a copy
    assert _temps(tmp_path) == []
    with pytest.raises(ValueError, match=r"meta\['step'\] = 5 disagrees with step = 50"):
        manager.save(50, _tensors(), {"step": 5})


def test_manager_copies_where_hard_links_fail(tmp_path, monkeypatch) -> None:
    def no_links(*args):
        raise OSError("links not supported")
    monkeypatch.setattr(os, "link", no_links)
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, _tensors(1), {})
    manager.save(2, _tensors(2), {})
    assert [step for step, _ in ckpt.periodic_checkpoints(tmp_path)] == [2]
    assert load_checkpoint(tmp_path / "checkpoint.npz")[1]["step"] == 2
    assert not os.path.samefile(tmp_path / "checkpoint.npz", tmp_path / "checkpoints" /
                                "step-00000002.npz")
    assert _temps(tmp_path) == []


def test_latest_falls_back_to_newest_periodic(tmp_path) -> None:
    periodic = tmp_path / "checkpoints"
    for step in (5, 12):
        save_checkpoint(periodic / f"step-{step:08d}.npz", _tensors(), {"step": step})
    (periodic / "step-notanumber.npz").write_bytes(b"")
    assert latest(tmp_path) == periodic / "step-00000012.npz"
