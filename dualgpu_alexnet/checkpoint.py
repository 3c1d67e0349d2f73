"""Whole-model checkpoints: one .npz in the PyTorch/Caffe layout, written atomically.

Layout of a checkpoint (every key loads with `np.load(path, allow_pickle=False)`):

- `conv1.weight` (96, 3, 11, 11) ... `fc8.bias`: the whole model, conventional names and shapes.
- `momentum.<name>`: the SGD momentum buffer of parameter `<name>` (e.g. `momentum.conv1.weight`).
- any other tensors the trainer adds (e.g. `rng.<name>` uint32 RNG state arrays).
- `meta.json`: 0-d unicode array holding JSON text (step, config TOML, schedule state, RNG state,
  data position, world size at save time, `format_version`).
- `meta.sha256`: 0-d unicode array, the SHA-256 over every other key's name, dtype, shape and bytes
  in sorted key order (see `tensor_checksum`).

A write goes to a temporary file in the target's directory, is fsynced, then `os.replace`d onto the
target, and the directory is fsynced: a crash at any point leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

FORMAT_VERSION = 1
META_KEY = "meta.json"
CHECKSUM_KEY = "meta.sha256"
RESERVED_PREFIX = "meta."
MOMENTUM_PREFIX = "momentum."
LATEST_NAME = "checkpoint.npz"
PERIODIC_DIR = "checkpoints"
_TEMP_SUFFIX = ".tmp"
_PERIODIC_RE = re.compile(r"^step-(\d{8,})\.npz$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit the model; the message names it."""


def tensor_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 hex digest over each key's name, dtype, shape and C-order bytes, keys sorted.

    Args:
        arrays: the tensors to hash (the checksum key itself must not be among them).
    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(target: Path) -> Path:
    """A fresh temporary name next to `target`: `.<name>.<random>.tmp` (not created)."""
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"


def _prepare_arrays(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                    path: Path) -> dict[str, np.ndarray]:
    """Validate the tensors and add `meta.json` and `meta.sha256`."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{path}: tensor names must be non-empty strings, got {name!r}")
        if name.startswith(RESERVED_PREFIX):
            raise CheckpointError(f"{path}: tensor name {name!r} uses the reserved prefix "
                                  f"{RESERVED_PREFIX!r}")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise CheckpointError(f"{path}: tensor {name} has dtype object, which cannot be "
                                  "loaded with allow_pickle=False")
        arrays[name] = array
    meta = {**meta, "format_version": meta.get("format_version", FORMAT_VERSION)}
    try:
        text = json.dumps(meta, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata is not JSON serialisable: {e}") from None
    arrays[META_KEY] = np.array(text)  # 0-d unicode array
    arrays[CHECKSUM_KEY] = np.array(tensor_checksum(arrays))
    return arrays


def _write_file_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, and rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        with open(temp, "xb") as f:  # exclusive create: a random name nobody else uses
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save_checkpoint(path: str | Path, tensors: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any]) -> None:
    """Write tensors + JSON metadata + checksum to one .npz, atomically.

    Args:
        path: target file; its previous content survives any crash during the write.
        tensors: name -> array (no object arrays, no names starting with "meta.").
        meta: JSON-able metadata (numpy scalars and arrays are converted); `format_version` is
            added when absent.
    """
    path = Path(path)
    arrays = _prepare_arrays(tensors, meta, path)
    _write_file_atomically(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path: str | Path, require_checksum: bool = True,
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint and verify its checksum.

    Args:
        path: the .npz file.
        require_checksum: if False, accept a file without `meta.sha256`/`meta.json` (weights
            converted from Caffe or PyTorch, for `--init`); a checksum that is present is always
            verified.
    Returns:
        (tensors without the `meta.*` keys, metadata dict; {} when the file has none).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: is a single .npy array, not an .npz checkpoint")
        with loaded as npz:
            arrays = {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except ValueError as e:
        if "Object arrays" in str(e):
            raise CheckpointError(f"{path}: holds object arrays, refused with "
                                  f"allow_pickle=False: {e}") from None
        raise CheckpointError(f"{path}: not an .npz checkpoint (corrupt, truncated or another "
                              f"format): {e}") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a readable .npz): "
                              f"{type(e).__name__}: {e}") from None
    stored = arrays.pop(CHECKSUM_KEY, None)
    if stored is None:
        if require_checksum:
            raise CheckpointError(f"{path}: has no {CHECKSUM_KEY} (not written by "
                                  "save_checkpoint); pass require_checksum=False to load "
                                  "converted weights")
    else:
        expected = str(stored[()]) if stored.dtype.kind == "U" and stored.ndim == 0 else None
        actual = tensor_checksum(arrays)
        if expected != actual:
            raise CheckpointError(f"{path}: checksum mismatch: {CHECKSUM_KEY} says {expected}, "
                                  f"the contents hash to {actual} (file corrupted or edited)")
    meta: dict[str, Any] = {}
    meta_array = arrays.pop(META_KEY, None)
    if meta_array is None:
        if require_checksum:
            raise CheckpointError(f"{path}: has no {META_KEY}")
    else:
        if meta_array.dtype.kind != "U" or meta_array.ndim != 0:
            raise CheckpointError(f"{path}: {META_KEY} must be a 0-d unicode array, got dtype "
                                  f"{meta_array.dtype} shape {meta_array.shape}")
        try:
            meta = json.loads(str(meta_array[()]))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: {META_KEY} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: {META_KEY} must hold a JSON object, got "
                                  f"{type(meta).__name__}")
        version = meta.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version!r} is newer than this code "
                                  f"reads ({FORMAT_VERSION})")
    unknown = sorted(n for n in arrays if n.startswith(RESERVED_PREFIX))
    if unknown:
        raise CheckpointError(f"{path}: unknown reserved keys {', '.join(unknown)}")
    return arrays, meta


def is_model_key(name: str) -> bool:
    """True for model parameter names such as "conv1.weight" (not "momentum.conv1.weight")."""
    return not name.startswith((MOMENTUM_PREFIX, RESERVED_PREFIX)) and (
        name.endswith((".weight", ".bias")))


def check_shapes(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                 path: str | Path) -> None:
    """Check that the model tensors (and any momentum buffers) are exactly what the model expects.

    Args:
        tensors: as returned by `load_checkpoint`.
        expected: parameter name -> shape, for the whole model.
        path: the file the tensors came from, for the message.
    Raises:
        CheckpointError listing every missing, extra or misshapen tensor with both shapes.
    """
    problems: list[str] = []
    missing = [name for name in expected if name not in tensors]
    if missing:
        problems.append(f"missing {', '.join(missing)} (the model expects them)")
    for name, array in tensors.items():
        base = name.removeprefix(MOMENTUM_PREFIX)
        if base in expected:
            want = tuple(expected[base])
            if tuple(array.shape) != want:
                problems.append(f"{name} has shape {tuple(array.shape)}, the model expects {want}")
        elif is_model_key(name) or name.startswith(MOMENTUM_PREFIX):
            problems.append(f"{name} {tuple(array.shape)} is not in the model "
                            "(a different architecture?)")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def add_prefix(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """{"conv1.weight": v} -> {"<prefix>conv1.weight": v} (e.g. prefix MOMENTUM_PREFIX)."""
    return {prefix + name: array for name, array in arrays.items()}


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries whose name starts with `prefix`, with the prefix removed."""
    return {name[len(prefix):]: a for name, a in tensors.items() if name.startswith(prefix)}


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temp files a killed writer left in `directory`; return what was removed."""
    removed = []
    for temp in Path(directory).glob(f".*.npz.*{_TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)
        removed.append(temp)
    return removed


def _publish(source: Path, target: Path) -> None:
    """Atomically make `target` hold the same content as the complete file `source`."""
    def copy(f: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)

    temp = _temp_path(target)
    try:
        os.link(source, temp)
    except OSError:  # no hard links on this file system: fall back to a copy
        _write_file_atomically(target, copy)
        return
    try:
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def periodic_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoints/step-XXXXXXXX.npz` in `run_dir`, oldest first."""
    directory = Path(run_dir) / PERIODIC_DIR
    found = []
    for path in directory.glob("step-*.npz") if directory.is_dir() else []:
        match = _PERIODIC_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: `checkpoint.npz`, else the newest periodic one.

    Args:
        run_dir: the run directory.
    Returns:
        Its path, or None when the run has no checkpoint.
    """
    path = Path(run_dir) / LATEST_NAME
    if path.is_file():
        return path
    periodic = periodic_checkpoints(run_dir)
    return periodic[-1][1] if periodic else None


class CheckpointManager:
    """Periodic checkpoints in run_dir/checkpoints/, the latest also as run_dir/checkpoint.npz."""

    latest = staticmethod(latest)

    def __init__(self, run_dir: str | Path, keep_last: int) -> None:
        """Create the directories and delete temp files a killed writer left behind.

        Args:
            run_dir: the run directory.
            keep_last: periodic checkpoints kept (>= 1); `checkpoint.npz` is kept besides.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.periodic_dir = self.run_dir / PERIODIC_DIR
        self.periodic_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.run_dir)
        remove_stale_temps(self.periodic_dir)

    def save(self, step: int, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
        """Write step-XXXXXXXX.npz, make it checkpoint.npz, then drop the oldest periodic files.

        Args:
            step: the training step (recorded as meta["step"]; must agree if meta has one).
            tensors: model tensors, momentum buffers and any other state arrays.
            meta: JSON-able metadata.
        Returns:
            The path of the periodic file.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if "step" in meta and meta["step"] != step:
            raise ValueError(f"meta['step'] = {meta['step']!r} disagrees with step = {step}")
        path = self.periodic_dir / f"step-{step:08d}.npz"
        save_checkpoint(path, tensors, {**meta, "step": step})
        _publish(path, self.run_dir / LATEST_NAME)
        for _, old in periodic_checkpoints(self.run_dir)[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path
