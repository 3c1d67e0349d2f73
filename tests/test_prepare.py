"""Image folders and the prepared cache: decoding, unreadable files, layouts, errors, demo data."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualgpu_alexnet.config import Config, load
from dualgpu_alexnet.data import compute_stats, open_data
from dualgpu_alexnet.datasets import load_digits_arrays
from dualgpu_alexnet.prepare import decode_image, prepare_cache, read_synsets, scan_folder
from launch import make_demo_data
from launch import prepare as prepare_main

S = 16  # stored image side in these tests


def cfg_for(size: int = S) -> Config:
    """The tiny preset storing size x size images (input_size bypasses the net's geometry check)."""
    base = load("tiny")
    return dataclasses.replace(base, model=dataclasses.replace(base.model, input_size=size - 2),
                               data=dataclasses.replace(base.data, image_size=size))


def real_photo() -> Image.Image:
    """A real JPEG photo that scikit-learn ships (china.jpg), without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "images" / "china.jpg" if spec else None
    if path is None or not path.is_file():
        pytest.skip("scikit-learn's sample photos are not installed")
    with Image.open(path) as img:
        return img.convert("RGB")


def digits_folder(root: Path, per_class: int = 6, classes: int = 3) -> dict[str, list[Path]]:
    """root/{train,val}/digit_<d>/*.png from the real 8x8 digits, upscaled to 24x20."""
    images, targets = load_digits_arrays()
    written: dict[str, list[Path]] = {"train": [], "val": []}
    for d in range(classes):
        members = np.flatnonzero(targets == d)[:per_class + 2]
        for split, chosen in (("train", members[:per_class]), ("val", members[per_class:])):
            folder = root / split / f"digit_{d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                path = folder / f"{i:04d}.png"
                Image.fromarray(np.uint8(images[i] * 15)).resize((24, 20)).save(path)
                written[split].append(path)
    return written


def jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def add_awkward_files(folder: Path) -> dict[str, Path]:
    """The files a real ImageNet copy contains: broken ones and odd-but-valid ones."""
    photo = real_photo().resize((72, 48))
    whole = jpeg_bytes(photo)
    files = {
        "zero": folder / "zero_bytes.JPEG",
        "truncated": folder / "truncated.JPEG",
        "text": folder / "not_an_image.JPEG",
        "png": folder / "png_named.JPEG",
        "cmyk": folder / "cmyk.JPEG",
        "palette": folder / "palette.png",
        "rgba": folder / "rgba.png",
        "grey": folder / "grey.png",
    }
    files["zero"].write_bytes(b"")
    files["truncated"].write_bytes(whole[:len(whole) * 2 // 3])
    files["text"].write_text("this is not an image\n")
    photo.save(files["png"], "PNG")
    files["cmyk"].write_bytes(jpeg_bytes(photo.convert("CMYK")))
    photo.convert("P").save(files["palette"])
    photo.convert("RGBA").save(files["rgba"])
    photo.convert("L").save(files["grey"])
    (folder / ".DS_Store").write_bytes(b"\0\1junk")  # hidden: ignored, not reported
    return files


# ----------------------------------------------------------------------------- decoding


def test_truncated_jpeg_passes_verify_but_is_skipped_and_reported(tmp_path: Path) -> None:
    digits_folder(tmp_path / "src")
    files = add_awkward_files(tmp_path / "src" / "train" / "digit_1")
    with Image.open(files["truncated"]) as img:
        img.verify()  # the trap: verify() does not decode the pixels
    result = prepare_cache(tmp_path / "src", tmp_path / "cache", S, workers=2, progress=False)
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    skipped = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {"zero_bytes.JPEG", "truncated.JPEG", "not_an_image.JPEG"}
    assert "truncated" in skipped["truncated.JPEG"]
    assert all(item["split"] == "train" for item in report["skipped"])
    assert result["counts"] == {"train": 18 + 5, "val": 6}  # 5 odd-but-valid files decoded
    assert result["skipped"] == 3


def test_cmyk_png_named_jpeg_palette_rgba_grey_all_decode_to_rgb(tmp_path: Path) -> None:
    files = add_awkward_files(tmp_path)
    photo = real_photo().resize((72, 48))
    reference = np.asarray(photo.resize((24, 16), Image.Resampling.BILINEAR))[:, 4:20]
    np.testing.assert_array_equal(decode_image(files["png"], S), reference)
    cmyk = decode_image(files["cmyk"], S).astype(int)
    assert cmyk.shape == (S, S, 3) and np.abs(cmyk - reference).mean() < 6  # JPEG loss only
    for name in ("palette", "rgba"):
        assert np.abs(decode_image(files[name], S).astype(int) - reference).mean() < 12
    grey = decode_image(files["grey"], S)
    assert grey.shape == (S, S, 3) and (grey[..., 0] == grey[..., 2]).all()
    for name in ("zero", "truncated", "text"):
        with pytest.raises(OSError):  # PIL.UnidentifiedImageError or "image file is truncated"
            decode_image(files[name], S)


def test_decode_resizes_the_shorter_side_then_centre_crops() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    buffer.seek(0)
    # shorter side 30 -> 12, so 50 -> 20, then the centre 12 columns: 4..16
    reference = np.asarray(Image.fromarray(pixels).resize((20, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(buffer, 12), reference[:, 4:16])


def test_strict_stops_at_the_first_unreadable_file_and_names_it(tmp_path: Path, capsys) -> None:
    digits_folder(tmp_path / "src")
    (tmp_path / "src" / "train" / "digit_2" / "zz_empty.JPEG").write_bytes(b"")
    code = prepare_main.main([str(tmp_path / "src"), "--out", str(tmp_path / "cache"),
                              "--image-size", str(S), "--strict", "--workers", "2", "--quiet"])
    assert code != 0
    assert "zz_empty.JPEG" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "meta.json").exists()
    with pytest.raises(ValueError, match="incomplete cache"):
        open_data(str(tmp_path / "cache"), cfg_for())


# ----------------------------------------------------------------------------- the cache


def test_cache_round_trip_gives_the_same_pixels_labels_classes_and_stats(tmp_path: Path,
                                                                         capsys) -> None:
    written = digits_folder(tmp_path / "src", per_class=5, classes=4)
    real_photo().save(tmp_path / "src" / "train" / "digit_3" / "photo.JPEG")
    code = prepare_main.main([str(tmp_path / "src"), "--out", str(tmp_path / "cache"),
                              "--image-size", str(S), "--workers", "2"])
    assert code == 0
    out = capsys.readouterr()
    assert "prepared 21 train + 8 val images of 4 classes" in out.out and "skipped 0" in out.out
    assert "train [" in out.err  # the progress bar
    train, val, stats = open_data(str(tmp_path / "cache"), cfg_for())
    assert isinstance(train.images, np.memmap) and train.images.dtype == np.uint8
    assert train.classes == val.classes == ["digit_0", "digit_1", "digit_2", "digit_3"]
    files = sorted(written["train"] + [tmp_path / "src" / "train" / "digit_3" / "photo.JPEG"])
    expected = np.stack([decode_image(p, S) for p in files])
    np.testing.assert_array_equal(train.images, expected)
    np.testing.assert_array_equal(train.labels, [int(p.parent.name[-1]) for p in files])
    np.testing.assert_array_equal(val.labels, [0, 0, 1, 1, 2, 2, 3, 3])
    reference = compute_stats(expected)
    np.testing.assert_allclose(stats.mean_image, reference.mean_image, rtol=1e-6)
    np.testing.assert_allclose(stats.eigval, reference.eigval, atol=1e-6 * stats.eigval[0])
    np.testing.assert_allclose(np.abs(stats.eigvec), np.abs(reference.eigvec), atol=1e-5)
    # the raw folder decoded on the fly gives the same data
    raw_train, raw_val, raw_stats = open_data(str(tmp_path / "src"), cfg_for())
    np.testing.assert_array_equal(raw_train.images, train.images)
    np.testing.assert_array_equal(raw_val.images, val.images)
    np.testing.assert_array_equal(raw_stats.mean_image, stats.mean_image)


def test_skipped_files_are_cut_from_the_cache_arrays(tmp_path: Path) -> None:
    digits_folder(tmp_path / "src", per_class=4, classes=2)
    (tmp_path / "src" / "train" / "digit_0" / "0000_bad.JPEG").write_text("nope")
    prepare_cache(tmp_path / "src", tmp_path / "cache", S, workers=1, progress=False)
    train, _, _ = open_data(str(tmp_path / "cache"), cfg_for())
    assert train.images.shape == (8, S, S, 3)
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 0, 1, 1, 1, 1])


def test_refuses_an_out_folder_that_is_not_a_cache_of_the_same_source(tmp_path: Path) -> None:
    digits_folder(tmp_path / "src", per_class=2, classes=2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not a cache of"):
        prepare_cache(tmp_path / "src", busy, S, workers=1, progress=False)
    assert (busy / "thesis.tex").read_text() == "precious" and len(list(busy.iterdir())) == 1
    prepare_cache(tmp_path / "src", tmp_path / "cache", S, workers=1, progress=False)
    prepare_cache(tmp_path / "src", tmp_path / "cache", S, workers=1, progress=False)  # redo: ok
    digits_folder(tmp_path / "other", per_class=2, classes=2)
    with pytest.raises(ValueError, match="not a cache of"):
        prepare_cache(tmp_path / "other", tmp_path / "cache", S, workers=1, progress=False)


def test_a_cache_of_another_image_size_is_refused(tmp_path: Path) -> None:
    digits_folder(tmp_path / "src", per_class=2, classes=2)
    prepare_cache(tmp_path / "src", tmp_path / "cache", S, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"image_size=16.*data.image_size=20"):
        open_data(str(tmp_path / "cache"), cfg_for(20))


# ----------------------------------------------------------------------------- bad folders


def test_bad_folders_raise_value_errors_naming_the_path(tmp_path: Path) -> None:
    cfg = cfg_for()
    with pytest.raises(ValueError, match="no such"):
        open_data(str(tmp_path / "missing"), cfg)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        open_data(str(tmp_path / "file.txt"), cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}/train: missing"):
        open_data(str(empty), cfg)
    (empty / "train").mkdir()
    (empty / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        open_data(str(empty), cfg)
    (empty / "train" / "cat").mkdir()
    with pytest.raises(ValueError, match=f"{empty}/train/cat: empty class folder"):
        open_data(str(empty), cfg)
    digits_folder(tmp_path / "src", per_class=2, classes=2)
    (tmp_path / "src" / "val" / "digit_7").mkdir()
    with pytest.raises(ValueError, match=r"\['digit_7'\] are not train classes"):
        open_data(str(tmp_path / "src"), cfg)


# ----------------------------------------------------------------------------- ILSVRC val


def ilsvrc_tree(root: Path) -> list[str]:
    """train/<wnid>/ folders and a flat val/ of 4 images named like ILSVRC2012's."""
    wnids = ["n01440764", "n02119789", "n09999999"]  # sorted: tench, kit fox, made up
    for i, wnid in enumerate(wnids):
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (20, 20), (80 * i, 0, 0)).save(root / "train" / wnid / "a.JPEG")
    (root / "val").mkdir()
    for n in (1, 2, 3, 4):
        Image.new("RGB", (20, 20), (0, 9 * n, 0)).save(root / "val" /
                                                        f"ILSVRC2012_val_{n:08d}.JPEG")
    return wnids


def test_ilsvrc_flat_val_with_devkit_ground_truth_and_id_ordered_synsets(tmp_path: Path) -> None:
    wnids = ilsvrc_tree(tmp_path)
    # ID order is not sorted-wnid order: ID 1 = n02119789, ID 2 = n09999999, ID 3 = n01440764
    (tmp_path / "synsets.txt").write_text("n02119789 kit fox\nn09999999 thing\nn01440764 tench\n")
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("3\n1\n2\n1\n")
    layout = scan_folder(tmp_path)
    assert layout.val_layout == "ilsvrc" and layout.classes == wnids
    np.testing.assert_array_equal(layout.val.labels, [0, 1, 2, 1])
    # map_clsloc.txt style ("wnid id name") in any line order gives the same mapping
    clsloc = tmp_path / "map_clsloc.txt"
    clsloc.write_text("n01440764 3 tench\nn02119789 1 kit_fox\nn09999999 2 thing\n")
    assert read_synsets(clsloc) == ["n02119789", "n09999999", "n01440764"]
    # a subset of the val images keeps its labels (rows are taken from the image numbers)
    (tmp_path / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    np.testing.assert_array_equal(scan_folder(tmp_path).val.labels, [0, 2, 1])


def test_ilsvrc_flat_val_with_kaggle_solution_csv(tmp_path: Path) -> None:
    ilsvrc_tree(tmp_path)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n09999999 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n02119789 5 6 7 8 n02119789 1 1 2 2\n"
        "ILSVRC2012_val_00000004,n01440764 1 1 1 1\nILSVRC2012_val_00000003,n01440764 0 0 1 1\n")
    np.testing.assert_array_equal(scan_folder(tmp_path).val.labels, [1, 2, 0, 0])


def test_ilsvrc_devkit_meta_mat_and_refusal_of_sorted_1000_line_mappings(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    ilsvrc_tree(tmp_path)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for row, (i, w) in enumerate([(2, "n09999999"), (1, "n02119789"), (1001, "n00001740"),
                                  (3, "n01440764")]):
        synsets[row] = (i, w)
    scipy_io.savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n1\n2\n3\n")
    np.testing.assert_array_equal(scan_folder(tmp_path).val.labels, [1, 1, 2, 0])
    sorted_mapping = tmp_path / "LOC_synset_mapping.txt"
    sorted_mapping.write_text("".join(f"n{i:08d} thing {i}\n" for i in range(1000)))
    with pytest.raises(ValueError, match="sorted order"):
        scan_folder(tmp_path, synsets=sorted_mapping)


def test_flat_val_without_label_files_is_refused(tmp_path: Path) -> None:
    ilsvrc_tree(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}/val: flat validation folder but no label"):
        scan_folder(tmp_path)


# ----------------------------------------------------------------------------- demo data


def test_make_demo_data_writes_the_digits_tree_with_the_right_counts(tmp_path: Path) -> None:
    assert make_demo_data.main([str(tmp_path / "digits"), "--size", "12"]) == 0
    _, targets = load_digits_arrays()
    per_class = np.bincount(targets)
    for d in range(10):
        train = list((tmp_path / "digits" / "train" / f"digit_{d}").glob("*.png"))
        val = list((tmp_path / "digits" / "val" / f"digit_{d}").glob("*.png"))
        assert len(val) == per_class[d] // 5 and len(train) + len(val) == per_class[d]
    assert sum(per_class) == 1797
    with Image.open(train[0]) as img:
        assert img.size == (12, 12)
    assert make_demo_data.main([str(tmp_path / "digits")]) != 0  # not empty: refused
