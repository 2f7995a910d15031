"""Image-folder data sets and the storage options of `facesense pack` (issue 16, sections 1 and 2).

Class order from the folder names or --classes, split folders, --store raw|encoded|auto,
--size, --channels, the CSV encoded as PNG, bad input (one line, nothing written), idempotence.
"""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import assert_nothing_written, csv_rows, one_line, write_fer_csv
from facesense.cli import app
from pack_source_helpers import colour_image, encode, folder_tree, label_from_colour, pil_decode
from pipeline import folders, pack_decode, pack_storage
from pipeline import pack as pack_module
from pipeline.classes import FER2013_CLASSES, FERPLUS_CLASSES, SPLITS
from pipeline.errors import PackError
from pipeline.pack import PackOptions, pack
from pipeline.shards import read_split, verify

AFFECTNET = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")


def run_pack(src, out, **opts):
    workers = opts.pop("workers", 1)
    force = opts.pop("force", False)
    return pack(src, out, PackOptions(**opts), workers=workers, force=force, show_progress=False)


def contents(out, split):
    arrays = read_split(out, split, with_ids=True)
    return arrays, dict(zip(arrays.ids, arrays.labels.tolist()))


# ----------------------------------------------------------------------------- class order

def test_ferplus_folder_names_get_ferplus_order_and_a_valid_folder_is_val(tmp_path):
    names = ["Anger", "contempt", "happiness", "neutral"]
    src = folder_tree(tmp_path / "src", names, {"train": 3, "valid": 2, "test": 1}, shape=(40, 40))
    manifest, _ = run_pack(src.root, tmp_path / "out", workers=2)
    assert manifest["classes"] == list(FERPLUS_CLASSES)
    assert manifest["class_order"]["source"] == "ferplus"
    assert manifest["source"]["format"] == "folders" and manifest["source"]["val_from_train"] is False
    for split in SPLITS:
        arrays, labels = contents(tmp_path / "out", split)
        assert set(labels) == src.ids_in(split) if split != "train" else set(labels) == src.train_or_val()
        for rid, label in labels.items():
            assert label == FERPLUS_CLASSES.index(names[src.labels[rid]].lower()), rid
    assert manifest["splits"]["train"]["channels"] == 3  # colour JPEGs: the source's own colour


def test_fer2013_names_with_a_validation_folder(tmp_path):
    src = folder_tree(tmp_path / "src", ["happy", "Sad", "neutral"], {"train": 2, "Validation": 2},
                      colour=False, shape=(48, 48))
    manifest, _ = run_pack(src.root, tmp_path / "out")
    assert manifest["classes"] == list(FER2013_CLASSES) and manifest["class_order"]["source"] == "fer2013"
    _, val = contents(tmp_path / "out", "val")
    assert set(val) == src.ids_in("val")
    assert {l for l in val.values()} == {3, 4, 6}
    assert manifest["splits"]["train"]["channels"] == 1  # FER2013: gray


def test_numbered_folders_need_classes_and_map_by_index(tmp_path):
    src = folder_tree(tmp_path / "src", [str(i) for i in range(8)], {"train": 2, "val": 1})
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(src.root, out)
    msg = one_line(str(err.value))
    assert "--classes" in msg and "0, 1, 2" in msg and "numbers" in msg
    assert_nothing_written(out)

    manifest, _ = run_pack(src.root, out, classes=AFFECTNET)
    assert manifest["classes"] == list(AFFECTNET)
    assert manifest["class_order"] == {"source": "--classes", "detail": manifest["class_order"]["detail"]}
    for split in ("train", "val"):
        arrays, labels = contents(out, split)
        for rid, label, img in zip(arrays.ids, arrays.labels, arrays.images):
            assert label == int(rid.split("/")[1]) == src.labels[rid] == label_from_colour(img)
    assert verify(out) == len(src.labels)


def test_more_than_ten_numbered_folders_sort_by_number(tmp_path):
    src = folder_tree(tmp_path / "src", [str(i) for i in range(11)], {"train": 1}, shape=(8, 8))
    classes = tuple(f"c{i}" for i in range(11))
    run_pack(src.root, tmp_path / "out", classes=classes, val_fraction=0.5)
    arrays = read_split(tmp_path / "out", "train", with_ids=True)
    assert all(label == int(i.split("/")[1]) for i, label in zip(arrays.ids, arrays.labels))


@pytest.mark.parametrize("folders_, classes, needles", [
    ([str(i) for i in range(8)], AFFECTNET[:7], ["folder 7", "--classes names 7", "neutral"]),
    ([str(i) for i in range(7)], AFFECTNET, ["'contempt'", "class 7", "folders found: 0, 1"]),
    (["cat", "dog"], None, ["unknown class folder 'cat'", "found: cat, dog", "angry", "contempt", "--classes"]),
    (["cat", "dog"], ("cat", "bird"), ["'dog'", "not in --classes (cat, bird)", "folders found: cat, dog"]),
    (["cat", "dog", "bird"], ("cat", "dog"), ["'bird'", "not in --classes"]),
    (["Cat", "dog"], ("cat", "dog", "bird"), ["'bird'", "no split has", "folders found: Cat, dog"]),
    (["1", "happy"], None, ["mix numbers and names"]),
])
def test_unknown_or_missing_class_folders_list_both_sides(tmp_path, folders_, classes, needles):
    src = folder_tree(tmp_path / "src", folders_, {"train": 1}, shape=(8, 8))
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(src.root, out, classes=classes)
    msg = one_line(str(err.value))
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert_nothing_written(out)


def test_classes_match_folder_names_in_any_case_in_their_own_order(tmp_path):
    src = folder_tree(tmp_path / "src", ["Dog", "cat"], {"train": 2, "test": 1}, shape=(16, 16))
    manifest, _ = run_pack(src.root, tmp_path / "out", classes=("cat", "dog"))
    assert manifest["classes"] == ["cat", "dog"]
    arrays, labels = contents(tmp_path / "out", "test")
    assert labels == {rid: 1 if "/Dog/" in rid else 0 for rid in src.ids_in("test")}


def test_two_val_folders_are_refused(tmp_path):
    src = folder_tree(tmp_path / "src", ["happy"], {"train": 1, "val": 1, "valid": 1}, shape=(48, 48))
    with pytest.raises(PackError) as err:
        run_pack(src.root, tmp_path / "out")
    assert "val/" in one_line(str(err.value)) and "valid/" in str(err.value)


def test_classes_option_parsing():
    from pipeline.imagefolders import parse_classes

    assert parse_classes(" a, b ,c") == ("a", "b", "c")
    assert parse_classes(None) is None
    for bad in ("a,,b", "", "a,A"):
        with pytest.raises(PackError):
            parse_classes(bad)


# ----------------------------------------------------------------------------- storage

def test_auto_is_raw_for_small_sets_and_encoded_over_the_limit(tmp_path, monkeypatch):
    src = folder_tree(tmp_path / "src", ["cat", "dog"], {"train": 3, "test": 2}, shape=(30, 40))
    manifest, _ = run_pack(src.root, tmp_path / "small", classes=("cat", "dog"))
    assert manifest["storage"]["requested"] == "auto"
    assert manifest["storage"]["why"].startswith("auto: raw") and "30x40x3" in manifest["storage"]["why"]
    assert manifest["splits"]["train"]["image_shape"] == [30, 40]
    assert read_split(tmp_path / "small", "train").images.shape[1:] == (30, 40, 3)

    monkeypatch.setattr(pack_storage, "AUTO_RAW_MAX_BYTES", 30 * 40 * 3 * 2)
    manifest, _ = run_pack(src.root, tmp_path / "big", classes=("cat", "dog"))
    assert manifest["storage"]["why"].startswith("auto: encoded") and "over" in manifest["storage"]["why"]
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["storage"] == "encoded" and entry["channels"] == 3
        assert entry["decoded_bytes"] == entry["count"] * 30 * 40 * 3
    assert verify(tmp_path / "big") == len(src.labels)


def test_mixed_sizes_are_encoded_by_auto_refused_by_raw_and_resized_with_size(tmp_path):
    src = folder_tree(tmp_path / "src", ["cat", "dog"], {"train": 2, "test": 1}, shape=(32, 32))
    odd = "train/dog/zz_odd.jpg"
    (src.root / odd).write_bytes(encode(colour_image(1, odd, (50, 20))))
    manifest, _ = run_pack(src.root, tmp_path / "auto", classes=("cat", "dog"))
    assert manifest["storage"]["why"].startswith("auto: images differ in size")
    assert manifest["splits"]["train"]["image_shape"] is None and manifest["splits"]["test"]["image_shape"] == [32, 32]

    with pytest.raises(PackError) as err:
        run_pack(src.root, tmp_path / "raw", store="raw", classes=("cat", "dog"))
    msg = one_line(str(err.value))
    assert str(src.root / odd) in msg and "20x50" in msg and "32x32" in msg and "--size" in msg
    assert_nothing_written(tmp_path / "raw")

    manifest, _ = run_pack(src.root, tmp_path / "skip", store="raw", skip_bad=True, classes=("cat", "dog"))
    assert [s["source"] for s in manifest["skipped"]] == [odd]

    run_pack(src.root, tmp_path / "sized", store="raw", size=24, classes=("cat", "dog"))
    arrays, _ = contents(tmp_path / "sized", "train")
    assert arrays.images.shape[1:] == (24, 24, 3)
    for rid, img in zip(arrays.ids, arrays.images):
        np.testing.assert_array_equal(img, pil_decode(src.root / rid, "RGB", (24, 24)))


@pytest.mark.parametrize("held", [True, False])
def test_encoded_keeps_every_file_byte_for_byte(tmp_path, monkeypatch, held):
    if not held:  # the shard writers read the files again (sources larger than KEEP_BYTES)
        monkeypatch.setattr(pack_decode, "KEEP_BYTES", 0)
    src = folder_tree(tmp_path / "src", ["cat", "dog"], {"train": 3, "test": 2}, shape=(20, 30), fmt="PNG")
    gray = "train/cat/zz_gray.png"
    (src.root / gray).write_bytes(encode(np.full((20, 30), 99, np.uint8), "PNG"))
    manifest, _ = run_pack(src.root, tmp_path / "out", store="encoded", workers=2, classes=("cat", "dog"))
    assert manifest["duplicates"]["method"].startswith("file bytes")
    seen = 0
    for split in SPLITS:
        arrays = read_split(tmp_path / "out", split, with_ids=True)
        assert arrays.channels == 3  # colour if any image is colour
        for rid, blob, shape in zip(arrays.ids, arrays.encoded.read(np.arange(len(arrays.labels))),
                                    arrays.encoded.shapes):
            assert blob.tobytes() == (src.root / rid).read_bytes()
            assert shape.tolist() == [20, 30, 1 if rid == gray else 3]
            seen += 1
    assert seen == len(src.labels) + 1
    assert f"train:{gray}" in manifest["duplicates"]["near_blank"] or f"val:{gray}" in manifest["duplicates"]["near_blank"]


def test_encoded_duplicates_are_byte_identical_files(tmp_path):
    src = folder_tree(tmp_path / "src", ["happy", "sad"], {"train": 2, "test": 1}, shape=(16, 16))
    copy = "test/happy/copy.jpg"
    (src.root / copy).write_bytes((src.root / "train/sad/sad_0.jpg").read_bytes())
    manifest, _ = run_pack(src.root, tmp_path / "out", store="encoded", dedupe=True)
    report = manifest["duplicates"]
    assert report["summary"]["groups"] == 1 and report["summary"]["conflicting_label_groups"] == 1
    assert report["summary"]["cross_split_groups"] == 1
    assert report["removed"] == ["train:train/sad/sad_0.jpg"] or report["removed"] == []  # it may be in val
    assert any(name.endswith(copy) for name in report["groups"][0])


@pytest.mark.parametrize("held", [True, False])
def test_a_file_changed_after_validation_is_not_stored(tmp_path, monkeypatch, held):
    """The bytes stored are the bytes validated: held in memory (small sources), or read again and
    checked against their digest (KEEP_BYTES exceeded), when a changed file fails the pack."""
    src = folder_tree(tmp_path / "src", ["happy"], {"train": 2}, shape=(16, 16))
    rel = "train/happy/happy_1.jpg"
    original = (src.root / rel).read_bytes()
    real = pack_decode.decode_files

    def decode_then_change(*args, **kwargs):
        facts = real(*args, **kwargs)
        (src.root / rel).write_bytes(encode(colour_image(0, "changed", (16, 16))))
        return facts

    monkeypatch.setattr(pack_decode, "decode_files", decode_then_change)
    if not held:
        monkeypatch.setattr(pack_decode, "KEEP_BYTES", 0)
        with pytest.raises(PackError) as err:
            run_pack(src.root, tmp_path / "out", store="encoded", val_fraction=0.5)
        assert rel in one_line(str(err.value)) and "changed while pack was running" in str(err.value)
        assert_nothing_written(tmp_path / "out")
        return
    run_pack(src.root, tmp_path / "out", store="encoded", val_fraction=0.5)
    stored = {}
    for split in SPLITS:
        arrays = read_split(tmp_path / "out", split, with_ids=True)
        stored.update(zip(arrays.ids, (b.tobytes() for b in arrays.encoded.read(np.arange(len(arrays.labels))))))
    assert stored[rel] == original


@pytest.mark.parametrize("store", ["raw", "encoded"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_corrupt_file_fails_naming_it_and_skip_bad_skips_it(tmp_path, store, workers):
    src = folder_tree(tmp_path / "src", ["cat", "dog"], {"train": 2, "test": 1}, shape=(16, 16))
    rel = "train/dog/dog_1.jpg"
    data = (src.root / rel).read_bytes()
    (src.root / rel).write_bytes(data[: len(data) // 2])
    (src.root / "test/cat/notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(src.root, out, store=store, classes=("cat", "dog"), workers=workers)
    assert str(src.root / "test/cat/notes.txt") in one_line(str(err.value)) or \
        str(src.root / rel) in str(err.value)
    assert_nothing_written(out)
    manifest, _ = run_pack(src.root, out, store=store, classes=("cat", "dog"), workers=workers, skip_bad=True)
    assert {s["source"] for s in manifest["skipped"]} == {rel, "test/cat/notes.txt"}
    assert sum(e["count"] for e in manifest["splits"].values()) == len(src.labels) - 1


# ----------------------------------------------------------------------------- channels and the FER2013 paths

def test_channels_one_makes_colour_folders_luma(tmp_path):
    src = folder_tree(tmp_path / "src", ["cat", "dog"], {"train": 2, "test": 2}, shape=(12, 20))
    for store in ("raw", "encoded"):
        manifest, _ = run_pack(src.root, tmp_path / store, classes=("cat", "dog"), channels=1, store=store)
        assert manifest["splits"]["test"]["channels"] == 1
    raw = read_split(tmp_path / "raw", "test", with_ids=True)
    assert raw.images.shape[1:] == (12, 20)
    for rid, img in zip(raw.ids, raw.images):
        np.testing.assert_array_equal(img, pil_decode(src.root / rid, "L"))
    enc = read_split(tmp_path / "encoded", "test")
    assert enc.encoded.shapes[:, 2].tolist() == [3] * len(enc.labels)  # each file's own, before conversion


def test_fer2013_folders_in_colour_and_resized_match_the_gray_fast_path(kaggle, tmp_path):
    run_pack(kaggle.root, tmp_path / "gray")
    manifest, _ = run_pack(kaggle.root, tmp_path / "rgb", channels=3)
    assert manifest["splits"]["train"]["channels"] == 3
    run_pack(kaggle.root, tmp_path / "big", size=64)
    for split in SPLITS:
        gray = read_split(tmp_path / "gray", split, with_ids=True)
        rgb = read_split(tmp_path / "rgb", split, with_ids=True)
        big = read_split(tmp_path / "big", split, with_ids=True)
        assert gray.ids == rgb.ids == big.ids
        np.testing.assert_array_equal(rgb.images, np.repeat(gray.images[..., None], 3, axis=-1))
        assert big.images.shape[1:] == (64, 64)
        for rid, img in zip(big.ids, big.images):
            np.testing.assert_array_equal(img, pil_decode(kaggle.root / rid, "L", (64, 64)))


@pytest.mark.parametrize("workers", [1, 2])
def test_the_fast_gray_path_matches_the_general_decode(kaggle, tmp_path, workers):
    """folders.decode_images (FER2013's fast path) against pack_decode (the plain Pillow path)."""
    paths = sorted(p.relative_to(kaggle.root).as_posix() for p in kaggle.root.rglob("*.*"))
    fast, keep, _, fast_id = folders.decode_images(kaggle.root, paths, workers=workers, resize=False,
                                                   skip_bad=False, show_progress=False)
    plan = pack_decode.DecodePlan(raw=True, channels=1, shape=(48, 48))
    facts = pack_decode.decode_files(kaggle.root, paths, plan, workers=workers, show_progress=False)
    assert keep.all() and facts.bad == []
    np.testing.assert_array_equal(fast, facts.images)
    assert folders.files_fingerprint(paths, facts.sizes, facts.mtimes) == fast_id


def test_fer2013_encoded_decodes_to_the_raw_pack(kaggle, tmp_path):
    run_pack(kaggle.root, tmp_path / "raw")
    manifest, _ = run_pack(kaggle.root, tmp_path / "enc", store="encoded")
    assert manifest["splits"]["train"]["channels"] == 1 and manifest["splits"]["train"]["image_shape"] == [48, 48]
    assert manifest["duplicates"]["summary"]["groups"] == 0
    for split in SPLITS:
        raw = read_split(tmp_path / "raw", split, with_ids=True)
        enc = read_split(tmp_path / "enc", split, with_ids=True)
        assert raw.ids == enc.ids
        decoded = [pil_decode(b.tobytes(), "L") for b in enc.encoded.read(np.arange(len(enc.labels)))]
        np.testing.assert_array_equal(np.stack(decoded), raw.images)


# ----------------------------------------------------------------------------- the CSV

def test_csv_encoded_as_lossless_png_and_raw_in_colour_or_resized(fer_csv, tmp_path):
    run_pack(fer_csv.path, tmp_path / "raw")
    manifest, _ = run_pack(fer_csv.path, tmp_path / "enc", store="encoded")
    assert manifest["splits"]["train"]["storage"] == "encoded"
    run_pack(fer_csv.path, tmp_path / "rgb", channels=3, size=56)
    for split in SPLITS:
        raw = read_split(tmp_path / "raw", split, with_ids=True)
        enc = read_split(tmp_path / "enc", split, with_ids=True)
        rgb = read_split(tmp_path / "rgb", split, with_ids=True)
        assert raw.ids == enc.ids == rgb.ids
        blobs = enc.encoded.read(np.arange(len(enc.labels)))
        assert all(b[:8].tobytes() == b"\x89PNG\r\n\x1a\n" for b in blobs)
        np.testing.assert_array_equal(np.stack([pil_decode(b.tobytes(), "L") for b in blobs]), raw.images)
        assert enc.encoded.shapes.tolist() == [[48, 48, 1]] * len(blobs)
        assert rgb.images.shape[1:] == (56, 56, 3)
        for img, gray in zip(rgb.images, raw.images):
            from PIL import Image

            want = np.asarray(Image.fromarray(gray).resize((56, 56), Image.Resampling.BILINEAR, reducing_gap=None))
            np.testing.assert_array_equal(img, np.repeat(want[..., None], 3, axis=-1))
    assert verify(tmp_path / "enc") == len(fer_csv.rows)


# ----------------------------------------------------------------------------- options and idempotence

@pytest.mark.parametrize("opts, needle", [
    (dict(store="zip"), "--store"),
    (dict(size=0), "--size 0"),
    (dict(size=5000), "--size 5000"),
    (dict(size=64, store="encoded"), "--store encoded"),
    (dict(resize=True, size=64), "--resize means --size 48"),
    (dict(channels=2), "--channels 2"),
    (dict(format="imagefolder", classes=("a",)), "not in --classes"),
])
def test_bad_options_are_one_line_and_write_nothing(kaggle, tmp_path, opts, needle):
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(kaggle.root, out, **opts)
    assert needle in one_line(str(err.value)), (needle, str(err.value))
    assert_nothing_written(out)


def test_classes_on_a_csv_is_refused(fer_csv, tmp_path):
    with pytest.raises(PackError) as err:
        run_pack(fer_csv.path, tmp_path / "out", classes=("a", "b"))
    assert "--classes" in one_line(str(err.value))


def test_new_options_are_part_of_the_fingerprint(tmp_path):
    src = folder_tree(tmp_path / "src", ["cat", "dog"], {"train": 2, "test": 1}, shape=(16, 16))
    out = tmp_path / "out"
    base = dict(classes=("cat", "dog"))
    runs = [dict(), dict(), dict(store="encoded"), dict(store="encoded"), dict(channels=1), dict(size=8),
            dict(size=8), dict(classes=("dog", "cat"))]
    built = [run_pack(src.root, out, **{**base, **extra})[1] for extra in runs]
    assert built == [True, False, True, False, True, True, False, True]
    test = read_split(out, "test", with_ids=True)
    assert dict(zip(test.ids, test.labels.tolist())) == {"test/cat/cat_0.jpg": 1, "test/dog/dog_0.jpg": 0}


def test_cli_pack_options_and_summary(tmp_path):
    src = folder_tree(tmp_path / "src", [str(i) for i in range(3)], {"train": 2, "val": 1}, shape=(20, 20))
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["pack", str(src.root), "--out", str(out), "--workers", "1", "--store", "encoded",
                                 "--classes", "neutral,happy,sad", "--channels", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = one_line(result.stdout)
    assert "train 6, val 3, test 0" in line and "3 classes" in line and "storage encoded (20x20, RGB" in line
    result = runner.invoke(app, ["pack", str(src.root), "--out", str(tmp_path / "o2"), "--size", "8",
                                 "--classes", "neutral,happy,sad", "--format", "imagefolder"])
    assert result.exit_code == 0, result.output
    assert "storage raw (8x8, RGB; auto)" in result.stdout
    result = runner.invoke(app, ["pack", str(src.root), "--out", str(tmp_path / "o3")])
    assert result.exit_code == 1 and "--classes" in one_line(result.stderr)
    assert_nothing_written(tmp_path / "o3")
    result = runner.invoke(app, ["pack", "--help"])
    for option in ("--store", "--size", "--channels", "--classes", "--raf-images", "rafdb"):
        assert option in result.stdout


def test_the_fer2013_fast_path_is_used_for_its_own_case(kaggle, tmp_path, monkeypatch):
    """FER2013 folders at 48x48 gray (auto or raw) keep the fast decode: the general one never runs."""
    def fail(*args, **kwargs):
        raise AssertionError("the general decode ran")

    monkeypatch.setattr(pack_decode, "decode_files", fail)
    monkeypatch.setattr(pack_decode, "probe_files", fail)
    for store in ("auto", "raw"):
        manifest, _ = run_pack(kaggle.root, tmp_path / store, store=store)
        assert manifest["storage"]["why"].startswith("auto: raw" if store == "auto" else "--store raw")
    manifest, _ = run_pack(kaggle.root, tmp_path / "resized", resize=True)
    assert manifest["splits"]["train"]["image_shape"] == [48, 48]


def test_fer2013_csv_rows_written_by_the_helpers_still_pack(tmp_path):
    path = write_fer_csv(tmp_path / "fer2013.csv", csv_rows({"train": 7}))
    manifest, _ = run_pack(path, tmp_path / "out", store="encoded", channels=3)
    assert manifest["splits"]["train"]["channels"] == 3 and manifest["class_order"]["source"] == "fer2013"
    assert pack_module.FORMATS[0] == "auto"
