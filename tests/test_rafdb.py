"""Packing RAF-DB's basic layout: labels 1..7 in RAF-DB's order, splits, colour, both storages, bad label files."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import assert_nothing_written, one_line
from pack_source_helpers import RAF_LABEL_FILE, label_from_colour, pil_decode, raf_tree
from pipeline.classes import RAFDB_CLASSES, SPLITS
from pipeline.errors import PackError
from pipeline.pack import PackOptions, pack
from pipeline.shards import load_manifest, read_split, verify


def run_pack(src, out, **opts):
    workers = opts.pop("workers", 1)
    force = opts.pop("force", False)
    return pack(src, out, PackOptions(**opts), workers=workers, force=force, show_progress=False)


@pytest.fixture
def raf(tmp_path):
    return raf_tree(tmp_path / "raf")


def test_raf_layout_labels_splits_and_colour_pixels(raf, tmp_path):
    out = tmp_path / "out"
    manifest, built = run_pack(raf.root, out, workers=2)
    assert built
    assert manifest["source"]["format"] == "rafdb" and manifest["source"]["raf_images"] == "aligned"
    assert manifest["classes"] == list(RAFDB_CLASSES) == ["surprise", "fear", "disgust", "happiness", "sadness",
                                                          "anger", "neutral"]
    assert manifest["class_order"]["source"] == "rafdb"
    assert manifest["storage"]["requested"] == "auto" and manifest["storage"]["why"].startswith("auto: raw")
    assert manifest["votes"] is False and manifest["source"]["val_from_train"] is True
    seen = {}
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert (entry["storage"], entry["channels"], entry["image_shape"]) == ("raw", 3, [100, 100])
        assert entry["decoded_bytes"] == entry["count"] * 100 * 100 * 3
        arrays = read_split(out, split, with_ids=True)
        assert arrays.images.shape == (entry["count"], 100, 100, 3) and arrays.channels == 3
        for rid, label, img in zip(arrays.ids, arrays.labels, arrays.images):
            assert label == raf.labels[rid] == label_from_colour(img), rid
            np.testing.assert_array_equal(img, pil_decode(raf.root / rid, "RGB"))  # Pillow's own decode, exactly
            seen[rid] = split
    assert {r for r, s in seen.items() if s == "test"} == raf.ids_in("test")
    assert {r for r, s in seen.items() if s != "test"} == raf.train_or_val()
    # val: a stratified slice of train, round(0.1 * 3) = 0 per class here -> 0; with a larger fraction 1 per class
    _, _ = run_pack(raf.root, tmp_path / "v", val_fraction=0.34)
    val = read_split(tmp_path / "v", "val")
    assert np.bincount(val.labels, minlength=7).tolist() == [1] * 7
    assert verify(out) == len(raf.labels)


def test_raf_encoded_keeps_the_file_bytes_and_decodes_to_the_raw_pixels(raf, tmp_path):
    run_pack(raf.root, tmp_path / "raw", store="raw")
    manifest, _ = run_pack(raf.root, tmp_path / "enc", store="encoded", workers=2)
    assert manifest["storage"] == {"requested": "encoded", "why": manifest["storage"]["why"]}
    assert manifest["splits"]["train"]["storage"] == "encoded" and manifest["splits"]["train"]["channels"] == 3
    for split in SPLITS:
        raw = read_split(tmp_path / "raw", split, with_ids=True)
        enc = read_split(tmp_path / "enc", split, with_ids=True)
        assert enc.images is None and enc.storage == "encoded"
        assert enc.ids == raw.ids  # the same seeded order whatever the storage
        blobs = enc.encoded.read(np.arange(len(enc.labels)))
        for rid, blob, shape, pixels in zip(enc.ids, blobs, enc.encoded.shapes, raw.images):
            assert blob.tobytes() == (raf.root / rid).read_bytes(), rid  # no re-encoding
            assert shape.tolist() == [100, 100, 3]
            np.testing.assert_array_equal(pil_decode(blob.tobytes(), "RGB"), pixels)
    assert verify(tmp_path / "enc") == len(raf.labels)


def test_raf_gray_is_itu_601_luma(raf, tmp_path):
    run_pack(raf.root, tmp_path / "out", channels=1)
    arrays = read_split(tmp_path / "out", "test", with_ids=True)
    assert arrays.images.shape[1:] == (100, 100) and arrays.channels == 1
    for rid, img in zip(arrays.ids, arrays.images):
        np.testing.assert_array_equal(img, pil_decode(raf.root / rid, "L"))


def test_raf_original_images_of_mixed_sizes(tmp_path):
    raf = raf_tree(tmp_path / "raf", n_train=2, n_test=1, original_shapes=[(120, 90), (100, 100), (64, 80)])
    manifest, _ = run_pack(raf.root, tmp_path / "auto", raf_images="original")
    assert manifest["storage"]["why"].startswith("auto: images differ in size")
    assert manifest["splits"]["train"]["storage"] == "encoded" and manifest["splits"]["train"]["image_shape"] is None
    enc = read_split(tmp_path / "auto", "train", with_ids=True)
    assert all(i.startswith("Image/original/train_") for i in enc.ids)
    test = read_split(tmp_path / "auto", "test")
    shapes = enc.encoded.shapes.tolist() + test.encoded.shapes.tolist()
    assert {tuple(s) for s in shapes} == {(120, 90, 3), (100, 100, 3), (64, 80, 3)}

    with pytest.raises(PackError) as err:
        run_pack(raf.root, tmp_path / "raw", raf_images="original", store="raw")
    msg = one_line(str(err.value))
    assert "--size" in msg and "Image/original/" in msg and "expected" in msg
    assert_nothing_written(tmp_path / "raw")

    manifest, _ = run_pack(raf.root, tmp_path / "sized", raf_images="original", store="raw", size=56)
    arrays = read_split(tmp_path / "sized", "train", with_ids=True)
    assert arrays.images.shape[1:] == (56, 56, 3) and manifest["splits"]["train"]["image_shape"] == [56, 56]
    for rid, img in zip(arrays.ids, arrays.images):
        np.testing.assert_array_equal(img, pil_decode(raf.root / rid, "RGB", (56, 56)))


def _edit_labels(raf, transform):
    path = raf.root / RAF_LABEL_FILE
    path.write_text("\n".join(transform(path.read_text().splitlines())) + "\n")
    return path


@pytest.mark.parametrize("case, line, needles", [
    ("label_zero", 3, ["label '0'", "1..7"]),
    ("label_eight", 3, ["label '8'", "1..7"]),
    ("label_word", 3, ["label 'happy'"]),
    ("duplicate", 4, ["listed again", "first on line 1"]),
    ("one_field", 2, ["expected '<image name> <label>'"]),
    ("bad_prefix", 2, ["neither train_ nor test_"]),
    ("missing_image", 5, ["not found"]),
])
def test_a_bad_label_file_line_is_named_and_nothing_is_written(raf, tmp_path, case, line, needles):
    def transform(lines):
        if case == "label_zero":
            lines[2] = lines[2].rsplit(" ", 1)[0] + " 0"
        elif case == "label_eight":
            lines[2] = lines[2].rsplit(" ", 1)[0] + " 8"
        elif case == "label_word":
            lines[2] = lines[2].rsplit(" ", 1)[0] + " happy"
        elif case == "duplicate":
            lines[3] = lines[0]
        elif case == "one_field":
            lines[1] = lines[1].split()[0]
        elif case == "bad_prefix":
            lines[1] = "val_00002.jpg 1"
        elif case == "missing_image":
            name = lines[4].split()[0]
            (raf.root / "Image/aligned" / name.replace(".jpg", "_aligned.jpg")).unlink()
        return lines

    path = _edit_labels(raf, transform)
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(raf.root, out)
    msg = one_line(str(err.value))
    assert f"{path}:{line}" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert_nothing_written(out)


def test_skip_bad_skips_a_missing_image(raf, tmp_path):
    rel = sorted(raf.labels)[0]
    (raf.root / rel).unlink()
    manifest, _ = run_pack(raf.root, tmp_path / "out", skip_bad=True)
    assert [s["source"] for s in manifest["skipped"]] == [rel]
    assert sum(e["count"] for e in manifest["splits"].values()) == len(raf.labels) - 1


def test_a_corrupt_raf_image_fails_naming_the_file(raf, tmp_path):
    rel = sorted(raf.labels)[3]
    data = (raf.root / rel).read_bytes()
    (raf.root / rel).write_bytes(data[:len(data) // 3])
    for store in ("raw", "encoded"):
        out = tmp_path / store
        with pytest.raises(PackError) as err:
            run_pack(raf.root, out, store=store)
        assert str(raf.root / rel) in one_line(str(err.value))
        assert_nothing_written(out)


def test_raf_is_idempotent_and_the_label_file_is_part_of_the_source(raf, tmp_path):
    out = tmp_path / "out"
    first, built = run_pack(raf.root, out)
    assert built
    again, built = run_pack(raf.root, out)
    assert built is False and again == first
    _, built = run_pack(raf.root, out, store="encoded")  # another option: another pack
    assert built
    _, built = run_pack(raf.root, out, store="encoded")
    assert built is False
    _edit_labels(raf, lambda lines: [lines[0].rsplit(" ", 1)[0] + " 7", *lines[1:]])
    manifest, built = run_pack(raf.root, out, store="encoded")
    assert built
    with h5py.File(out / manifest["splits"]["train"]["shards"][0]["file"]) as f:
        assert json.loads(f.attrs["classes"]) == list(RAFDB_CLASSES) and f.attrs["storage"] == "encoded"
    assert load_manifest(out)["class_order"]["source"] == "rafdb"


def test_raf_only_options_are_refused_elsewhere_and_vice_versa(raf, tmp_path, kaggle):
    cases = [
        (raf.root, dict(classes=("a", "b")), "--classes"),
        (kaggle.root, dict(raf_images="original"), "--raf-images"),
        (raf.root, dict(raf_images="cropped"), "--raf-images"),
        (kaggle.root, dict(format="rafdb"), "list_patition_label.txt"),
    ]
    for src, opts, needle in cases:
        out = tmp_path / "out"
        with pytest.raises(PackError) as err:
            run_pack(src, out, **opts)
        assert needle in one_line(str(err.value)), opts
        assert_nothing_written(out)
