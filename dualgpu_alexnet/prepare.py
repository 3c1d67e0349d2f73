"""Read image folders: scan the layout, decode every image once (in parallel), write the cache.

Run: `python -m launch.prepare SRC --out CACHE [--image-size 256] [--workers N] [--strict]`

Layouts of SRC:
- `SRC/train/<class>/<image>` and `SRC/val/<class>/<image>` (ImageNet's train layout, any
  Pillow-readable file whatever its extension; files in sub-folders of a class count too).
  Classes = the sorted train folder names; every val class must be a train class. Names starting
  with "." are ignored.
- ILSVRC-2012 validation: `SRC/val/` holds the 50,000 images flat (ILSVRC2012_val_00000001.JPEG,
  ...). Labels come from, first found in SRC/val, SRC, SRC/ILSVRC2012_devkit_t12/data or
  SRC/devkit/data:
  `LOC_val_solution.csv` (Kaggle: "ImageId,PredictionString", first token = wnid), or the devkit's
  `ILSVRC2012_validation_ground_truth.txt` (one 1-based ILSVRC2012_ID per line in file-name order)
  with a synset mapping in ILSVRC2012_ID order: the devkit's `meta.mat`, `map_clsloc.txt`
  ("wnid id name" lines) or `synsets.txt` (one wnid, or "wnid description", per line). The ID
  order is meta.mat's (ID 1 = n02119789 kit fox), *not* sorted-wnid order, so Kaggle's
  `LOC_synset_mapping.txt` and Caffe's `synset_words.txt` do not fit the devkit ground truth (a
  1000-line mapping in sorted order is refused). A file named `ILSVRC2012_val_<n>` gets line n;
  other names take lines in sorted-name order. Labels = indices of the sorted train wnids.

Each image is fully decoded (a truncated JPEG passes `verify()` but fails here), converted to RGB
(CMYK, L, P, RGBA, 16-bit grey), its shorter side resized to S (Pillow bilinear, antialiased) and
centre-cropped to S x S. Unreadable files are skipped and listed in `report.json`; with `strict`
the first one stops the run.

Cache layout (CACHE): `source.json` (written first), `train_images.npy` / `val_images.npy` (uint8
N,S,S,3 written through `np.lib.format.open_memmap`, so RAM stays bounded), `train_labels.npy` /
`val_labels.npy` (int64), `classes.json`, `stats.npz` (mean_image, eigval, eigvec of the train
split), `report.json` (skipped files) and `meta.json` (image_size, counts, version) written last.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from dualgpu_alexnet import datasets

_LABEL_DIRS = (".", "ILSVRC2012_devkit_t12/data", "devkit/data")  # besides SRC/val
_SOLUTION_NAMES = ("LOC_val_solution.csv",)
_GROUND_TRUTH_NAMES = ("ILSVRC2012_validation_ground_truth.txt",)
_SYNSET_NAMES = ("meta.mat", "map_clsloc.txt", "synsets.txt")
_LABEL_FILES = set(_SOLUTION_NAMES + _GROUND_TRUTH_NAMES + _SYNSET_NAMES)


@dataclass
class Split:
    """Image files of one split and their labels."""

    paths: list[Path]
    labels: np.ndarray  # int64 (N,)


@dataclass
class FolderLayout:
    """What `scan_folder` found: classes and the files of both splits."""

    classes: list[str]
    train: Split
    val: Split
    val_layout: str  # "folders" (val/<class>/...) or "ilsvrc" (flat val/ + label files)


# ----------------------------------------------------------------------------- scanning

def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """Visible files below `folder` (recursively, hidden folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found)


def _class_split(folder: Path, classes: list[str]) -> Split:
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p)):
        files = _files_under(sub)
        paths += files
        labels += [index[sub.name]] * len(files)
    return Split(paths, np.array(labels, np.int64))


def scan_folder(root: str | Path, val_labels: str | Path | None = None,
                synsets: str | Path | None = None) -> FolderLayout:
    """Find the classes and image files of SRC/train and SRC/val (see the module docstring).

    Args:
        root: the folder SRC holding train/ and val/.
        val_labels: ILSVRC flat val only: the ground-truth file (default: searched by name).
        synsets: ILSVRC flat val only: the ID-ordered synset mapping (default: searched by name).
    Returns:
        The FolderLayout; a ValueError names the folder and the problem otherwise.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    train_dir, val_dir = root / "train", root / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: missing (expected {root}/train/<class>/<images> and "
                             f"{root}/val/<class>/<images>, or a cache made by launch.prepare)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise ValueError(f"{train_dir}: no class folders (expected {train_dir}/<class>/<images>)")
    train = _class_split(train_dir, classes)
    counts = np.bincount(train.labels, minlength=len(classes))
    if (counts == 0).any():
        raise ValueError(f"{train_dir / classes[int(np.argmin(counts))]}: empty class folder")
    val_classes = sorted(p.name for p in val_dir.iterdir() if p.is_dir() and _visible(p))
    if val_classes:
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise ValueError(f"{val_dir}: classes {unknown[:5]} are not train classes "
                             f"(val classes must be a subset of the {len(classes)} in {train_dir})")
        val, layout = _class_split(val_dir, classes), "folders"
    else:
        val, layout = _ilsvrc_val(root, val_dir, classes, val_labels, synsets), "ilsvrc"
    if len(val.paths) == 0:
        raise ValueError(f"{val_dir}: no images")
    return FolderLayout(classes, train, val, layout)


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    for folder in (root / "val", *(root / d for d in _LABEL_DIRS)):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def read_synsets(path: Path) -> list[str]:
    """Wnids in ILSVRC2012_ID order from meta.mat, "wnid id name" lines or "wnid ..." lines."""
    if path.suffix == ".mat":
        from scipy.io import loadmat

        synsets = loadmat(path, squeeze_me=True)["synsets"]
        pairs = sorted((int(i), str(w)) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"],
                                                        strict=True) if 1 <= int(i) <= 1000)
        return [w for _, w in pairs]
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if rows and all(len(r) >= 2 and r[1].isdigit() for r in rows):  # map_clsloc: wnid id name
        return [w for _, w in sorted((int(r[1]), r[0]) for r in rows)]
    wnids = [r[0] for r in rows]
    if len(wnids) == 1000 and wnids == sorted(wnids):
        raise ValueError(f"{path}: lists the 1000 wnids in sorted order, but ILSVRC2012_IDs follow "
                         "the devkit's meta.mat order (ID 1 = n02119789): use meta.mat or "
                         "map_clsloc.txt, or LOC_val_solution.csv")
    return wnids


def _ilsvrc_val(root: Path, val_dir: Path, classes: list[str], val_labels: str | Path | None,
                synsets: str | Path | None) -> Split:
    """Labels of a flat ILSVRC-2012 val folder, as indices of the sorted train wnids."""
    paths = [p for p in _files_under(val_dir) if p.name not in _LABEL_FILES]
    if not paths:
        raise ValueError(f"{val_dir}: no class folders and no images")
    label_file = Path(val_labels) if val_labels else (_find(root, _SOLUTION_NAMES)
                                                      or _find(root, _GROUND_TRUTH_NAMES))
    if label_file is None or not label_file.is_file():
        raise ValueError(f"{val_dir}: flat validation folder but no label file "
                         f"{label_file or ' or '.join(_SOLUTION_NAMES + _GROUND_TRUTH_NAMES)} "
                         f"(looked in {val_dir}, {root} and the devkit data folder)")
    if label_file.suffix == ".csv":  # ImageId,PredictionString: the first token is the wnid
        try:
            by_stem = {ln.split(",")[0]: ln.split(",")[1].split()[0]
                       for ln in label_file.read_text().splitlines()[1:] if ln.strip()}
        except IndexError:
            raise ValueError(f"{label_file}: expected 'ImageId,wnid ...' lines") from None
        missing = [p.name for p in paths if p.stem not in by_stem]
        if missing:
            raise ValueError(f"{label_file}: no label for {missing[:3]} in {val_dir}")
        wnids = [by_stem[p.stem] for p in paths]
    else:
        mapping_file = Path(synsets) if synsets else _find(root, _SYNSET_NAMES)
        if mapping_file is None or not mapping_file.is_file():
            raise ValueError(f"{label_file}: needs a synset mapping in ILSVRC2012_ID order "
                             f"({' or '.join(_SYNSET_NAMES)}) next to it or in {root}")
        id_to_wnid = read_synsets(mapping_file)
        try:
            ids = [int(t) for t in label_file.read_text().split()]
        except ValueError:
            raise ValueError(f"{label_file}: expected one integer ILSVRC2012_ID per line") from None
        if not ids:
            raise ValueError(f"{label_file}: no labels")
        numbers = [re.search(r"ILSVRC2012_val_(\d+)", p.stem) for p in paths]
        if all(numbers):
            rows = [int(m.group(1)) - 1 for m in numbers]  # type: ignore[union-attr]
        elif len(paths) == len(ids):
            rows = list(range(len(paths)))
        else:
            raise ValueError(f"{label_file}: {len(ids)} labels for {len(paths)} images in "
                             f"{val_dir} whose names do not carry the image number")
        if max(rows) >= len(ids) or max(ids) > len(id_to_wnid) or min(ids) < 1:
            raise ValueError(f"{label_file}: {len(ids)} IDs in 1..{max(ids)}, {val_dir} needs "
                             f"row {max(rows) + 1}; {mapping_file} maps {len(id_to_wnid)} IDs")
        wnids = [id_to_wnid[ids[r] - 1] for r in rows]
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(wnids) - set(index))
    if unknown:
        raise ValueError(f"{label_file}: val classes {unknown[:5]} are not train classes "
                         f"(folders of {root / 'train'})")
    return Split(paths, np.array([index[w] for w in wnids], np.int64))


# ----------------------------------------------------------------------------- decoding

def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits
        return Image.fromarray((np.asarray(img, np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")  # CMYK, L, LA, P, RGBA, YCbCr, ...: alpha is dropped


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Fully decode an image file; RGB; shorter side resized to `size`; centre crop.

    Args:
        path: any file Pillow reads (the extension is not trusted).
        size: side S of the result.
    Returns:
        uint8 (S, S, 3). Raises (OSError, ValueError, ...) if the file is not a whole image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels are fine
        with Image.open(path) as img:
            img.draft(img.mode, (size, size))  # JPEG: decode at the smallest scale >= size
            img.load()  # full decode: truncated files fail here, not in verify()
            rgb = _to_rgb(img)
            w, h = rgb.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            # Resizing the centred side x side square = shorter side to S, then centre crop.
            out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
            return np.asarray(out, dtype=np.uint8).copy()


def _decode_job(job: tuple[str, int]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Worker: (image, its RGB scatter, "") or (None, None, reason)."""
    try:
        image = decode_image(job[0], job[1])
        return image, datasets.rgb_scatter(image), ""
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable": report it
        return None, None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _decoded(paths: list[Path], size: int, workers: int,
             processes: bool) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, str]]:
    """Decode results in the order of `paths`, in `workers` processes (or threads)."""
    jobs = ((str(p), size) for p in paths)
    if workers <= 1 or len(paths) < 2:
        yield from map(_decode_job, jobs)
    elif processes:
        with get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_decode_job, jobs, chunksize=4)
    else:  # threads: Pillow releases the GIL while decoding and resizing
        threads = ThreadPoolExecutor(workers)
        try:
            yield from threads.map(_decode_job, jobs)
        finally:
            threads.shutdown(wait=True, cancel_futures=True)


class Progress:
    """A one-line progress bar on stderr, redrawn at most 5 times a second."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        """Show `done` of `total`."""
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        filled = int(30 * done / max(self.total, 1))
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                         f"{done}/{self.total} {rate:.0f} img/s")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def decode_split(split: Split, size: int, out: np.ndarray, workers: int, strict: bool,
                 stats: datasets.StatsAccumulator | None = None, processes: bool = True,
                 label: str = "decode", progress: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Decode a split into out[0..k) (readable images, in order); k = len of returned labels.

    Args:
        split: files and labels; out: uint8 (N, S, S, 3) array or memmap with N >= len(files).
        workers: decode workers (0 = one per core); strict: stop at the first unreadable file.
        stats: accumulates the mean image and RGB covariance of the readable images.
        processes: a process pool (else threads); label/progress: the progress bar.
    Returns:
        (labels of the kept images, [{"path", "reason"} of every skipped file]).
    """
    workers = workers or os.cpu_count() or 1
    bar = Progress(label, len(split.paths), progress)
    kept: list[int] = []
    skipped: list[dict] = []
    results = _decoded(split.paths, size, workers, processes)
    try:
        for i, (image, scatter, reason) in enumerate(results):
            if image is None:
                if strict:
                    raise ValueError(f"{split.paths[i]}: unreadable image ({reason}); "
                                     "run without --strict to skip such files")
                skipped.append({"path": str(split.paths[i]), "reason": reason})
            else:
                out[len(kept)] = image
                kept.append(i)
                if stats is not None:
                    stats.add(image[None], scatter)
            bar.update(i + 1)
    finally:
        results.close()  # stops the workers now, also when an error leaves the loop
    return split.labels[kept], skipped


# ----------------------------------------------------------------------------- the cache

def _check_out(out: Path, source: Path) -> None:
    """Refuse a non-empty --out unless it is a cache (complete or not) of the same source."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / datasets.SOURCE_FILE).read_text()).get("source")
    except (OSError, ValueError):
        previous = None
    if previous != str(source):
        found = f"made from {previous}" if previous else f"no {datasets.SOURCE_FILE}"
        raise ValueError(f"{out}: not empty and not a cache of {source} ({found}); "
                         "nothing was overwritten: choose another --out")


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def _truncate_npy(path: Path, count: int) -> None:
    """Keep the first `count` images of an .npy file (after skipped files), chunk by chunk."""
    full = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.stem + ".part.npy")
    short = np.lib.format.open_memmap(tmp, "w+", np.uint8, (count, *full.shape[1:]))
    for start in range(0, count, 256):
        stop = min(start + 256, count)
        short[start:stop] = full[start:stop]
    short.flush()
    del short, full
    os.replace(tmp, path)


def prepare_cache(src: str | Path, out: str | Path, image_size: int = 256, workers: int = 0,
                  strict: bool = False, val_labels: str | Path | None = None,
                  synsets: str | Path | None = None, progress: bool = True) -> dict:
    """Decode SRC once into the memory-mappable cache OUT (layouts: the module docstring).

    Args:
        src: image folder (train/ and val/); out: cache folder (missing, empty or a cache of src).
        image_size: side S of the stored images; workers: decode processes (0 = one per core).
        strict: stop (ValueError naming the file) at the first unreadable file instead of skipping.
        val_labels, synsets: label files of a flat ILSVRC val folder (default: found by name).
        progress: draw progress bars on stderr.
    Returns:
        The meta.json contents plus "skipped_files": [{"split", "path", "reason"}, ...].
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    source, out = Path(src).resolve(), Path(out)
    layout = scan_folder(source, val_labels, synsets)
    _check_out(out, source)
    out.mkdir(parents=True, exist_ok=True)
    (out / datasets.META_FILE).unlink(missing_ok=True)  # from now on the cache is incomplete
    _write_json(out / datasets.SOURCE_FILE, {"source": str(source), "image_size": image_size})
    stats = datasets.StatsAccumulator(image_size)
    counts, skipped = {}, []
    for name, split in (("train", layout.train), ("val", layout.val)):
        path = out / f"{name}_images.npy"
        images = np.lib.format.open_memmap(path, "w+", np.uint8,
                                           (len(split.paths), image_size, image_size, 3))
        labels, bad = decode_split(split, image_size, images, workers, strict,
                                   stats if name == "train" else None, label=name,
                                   progress=progress)
        images.flush()
        del images
        if len(labels) == 0:
            raise ValueError(f"{source / name}: no readable images ({len(bad)} skipped)")
        if len(labels) < len(split.paths):
            _truncate_npy(path, len(labels))
        np.save(out / f"{name}_labels.npy", labels)
        counts[name] = len(labels)
        skipped += [{"split": name, **b} for b in bad]
    result = stats.result()
    np.savez(out / "stats.npz", mean_image=result.mean_image, eigval=result.eigval,
             eigvec=result.eigvec)
    _write_json(out / "classes.json", layout.classes)
    _write_json(out / "report.json", {"source": str(source), "skipped": skipped})
    meta = {"version": datasets.CACHE_VERSION, "image_size": image_size, "counts": counts,
            "num_classes": len(layout.classes), "source": str(source),
            "val_layout": layout.val_layout, "skipped": len(skipped)}
    _write_json(out / datasets.META_FILE, meta)  # last: its presence marks the cache complete
    return {**meta, "skipped_files": skipped}
