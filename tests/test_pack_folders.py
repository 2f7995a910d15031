"""Packing the Kaggle image-folder layout: splits, labels, pixels, bad inputs, duplicates, idempotency."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (CLASS_BASE, Tree, assert_nothing_written, class_image, label_from_pixels,
                      one_line, partials_beside, png_tree, save_image, write_tree)
from pipeline import pack as pack_module
from pipeline import interrupts, staging
from pipeline.classes import FER2013_CLASSES, SPLITS, folder_class_index
from pipeline.errors import BadItem, PackError
from pipeline.pack import PackOptions, pack
from pipeline.shards import read_split, verify


def run_pack(src, out, **opts):
    workers = opts.pop("workers", 1)
    force = opts.pop("force", False)
    return pack(src, out, PackOptions(**opts), workers=workers, force=force, show_progress=False)


def split_contents(out: Path) -> dict[str, dict[str, tuple[int, np.ndarray]]]:
    """split -> {id: (label, image)} read back through the public reader."""
    result = {}
    for split in SPLITS:
        arrays = read_split(out, split, with_ids=True)
        assert len(arrays.ids) == len(arrays.labels) == len(arrays.images)
        assert len(set(arrays.ids)) == len(arrays.ids), "an id appears twice in one split"
        result[split] = {i: (int(l), img) for i, l, img in zip(arrays.ids, arrays.labels, arrays.images)}
    return result


# ----------------------------------------------------------------------------- class names

def test_folder_names_map_onto_fer2013_order_in_any_case():
    expected = {"angry": 0, "disgust": 1, "fear": 2, "happy": 3, "sad": 4, "surprise": 5, "neutral": 6}
    for name, index in expected.items():
        assert folder_class_index(name) == index
        assert folder_class_index(name.upper()) == index
        assert folder_class_index(name.capitalize()) == index
    assert folder_class_index("joy") is None
    assert folder_class_index("") is None


# ----------------------------------------------------------------------------- the Kaggle layout

def test_kaggle_layout_splits_labels_and_pixels(kaggle: Tree, tmp_path):
    out = tmp_path / "shards"
    manifest, built = run_pack(kaggle.root, out)
    assert built
    assert manifest["classes"] == list(FER2013_CLASSES)
    assert manifest["source"]["format"] == "folders"
    assert manifest["source"]["val_from_train"] is False
    got = split_contents(out)
    for split in SPLITS:
        assert set(got[split]) == kaggle.ids_in(split), split
        assert manifest["splits"][split]["count"] == len(kaggle.ids_in(split))
        expected_counts = Counter(FER2013_CLASSES[kaggle.labels[i]] for i in kaggle.ids_in(split))
        assert manifest["splits"][split]["class_counts"] == {c: expected_counts.get(c, 0) for c in FER2013_CLASSES}
        for rel, (label, img) in got[split].items():
            assert label == kaggle.labels[rel], rel
            assert img.dtype == np.uint8 and img.shape == (48, 48)
            if rel.endswith(".png"):
                np.testing.assert_array_equal(img, kaggle.pixels[rel], err_msg=rel)
            else:  # JPEG is lossy: close, and still recognisably its class
                assert np.abs(img.astype(int) - kaggle.pixels[rel]).mean() < 8, rel
                assert label_from_pixels(img) == label
    assert verify(out) == len(kaggle.labels)


def test_label_is_the_fer2013_index_not_alphabetical(tmp_path):
    # Alphabetically neutral < sad < surprise would be 0, 1, 2; FER2013 says 6, 4, 5.
    tree = png_tree(tmp_path / "src", {"neutral": 3, "sad": 3, "surprise": 3}, prefix="Training_")
    tree.add("test/Neutral/PublicTest_x.png", 6, "val")
    out = tmp_path / "out"
    run_pack(tree.root, out)
    train = read_split(out, "train", with_ids=True)
    by_folder = {i.split("/")[1]: int(l) for i, l in zip(train.ids, train.labels)}
    assert by_folder == {"neutral": 6, "sad": 4, "surprise": 5}
    val = read_split(out, "val", with_ids=True)
    assert val.ids == ["test/Neutral/PublicTest_x.png"] and val.labels.tolist() == [6]


def test_prefix_decides_the_split_whatever_the_top_folder(tmp_path):
    tree = write_tree(tmp_path / "src", [
        ("train", "happy", "Training_1.png", 3),
        ("train", "happy", "PublicTest_2.png", 3),
        ("train", "sad", "PrivateTest_3.png", 4),
        ("test", "sad", "Training_4.png", 4),
        ("test", "angry", "PublicTest_5.png", 0),
        ("test", "angry", "PrivateTest_6.png", 0),
    ])
    assert tree.ids_in("train") == {"train/happy/Training_1.png", "test/sad/Training_4.png"}
    out = tmp_path / "out"
    manifest, _ = run_pack(tree.root, out)
    got = split_contents(out)
    for split in SPLITS:
        assert set(got[split]) == tree.ids_in(split)
    assert manifest["source"]["val_from_train"] is False


def test_unprefixed_test_folder_is_test_and_val_is_a_stratified_slice_of_train(tmp_path):
    per_class = {"angry": 20, "happy": 10, "sad": 30, "neutral": 40}
    tree = png_tree(tmp_path / "src", per_class)  # unprefixed train/
    test_tree = png_tree(tmp_path / "src", {"angry": 2, "fear": 3}, top="test", start=1000)
    out = tmp_path / "out"
    manifest, _ = run_pack(tree.root, out, val_fraction=0.2, seed=3)
    assert manifest["source"]["val_from_train"] is True
    got = split_contents(out)
    assert set(got["test"]) == set(test_tree.labels)
    assert set(got["train"]) | set(got["val"]) == set(tree.labels)
    assert not set(got["train"]) & set(got["val"])
    val_counts = manifest["splits"]["val"]["class_counts"]
    train_counts = manifest["splits"]["train"]["class_counts"]
    for cls, n in per_class.items():
        assert val_counts[cls] == round(0.2 * n), cls  # per-class proportion, not just overall
        assert train_counts[cls] == n - round(0.2 * n), cls
    assert val_counts["fear"] == train_counts["fear"] == 0
    assert manifest["splits"]["test"]["class_counts"]["fear"] == 3

    same, _ = run_pack(tree.root, tmp_path / "same", val_fraction=0.2, seed=3)
    assert set(read_split(tmp_path / "same", "val", with_ids=True).ids) == set(got["val"])
    run_pack(tree.root, tmp_path / "other", val_fraction=0.2, seed=4)
    other_val = set(read_split(tmp_path / "other", "val", with_ids=True).ids)
    assert other_val != set(got["val"])
    assert len(other_val) == len(got["val"])


def test_unprefixed_train_stays_train_when_public_test_exists(tmp_path):
    tree = png_tree(tmp_path / "src", {"angry": 10, "happy": 10})
    public = png_tree(tmp_path / "src", {"angry": 2}, top="test", prefix="PublicTest_", start=500)
    out = tmp_path / "out"
    manifest, _ = run_pack(tree.root, out, val_fraction=0.5)
    got = split_contents(out)
    assert set(got["train"]) == set(tree.labels)
    assert set(got["val"]) == set(public.labels)
    assert manifest["source"]["val_from_train"] is False


def test_multiprocess_decoding_matches_single_process(kaggle: Tree, tmp_path):
    run_pack(kaggle.root, tmp_path / "one", workers=1)
    run_pack(kaggle.root, tmp_path / "two", workers=2)
    for split in SPLITS:
        a = read_split(tmp_path / "one", split, with_ids=True)
        b = read_split(tmp_path / "two", split, with_ids=True)
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


# ----------------------------------------------------------------------------- resize and colour

def test_wrong_size_fails_without_resize_and_is_resized_with_it(tmp_path):
    tree = png_tree(tmp_path / "src", {"happy": 3}, prefix="Training_")
    big = class_image(5, "big", side=96)
    save_image(tree.root / "train/surprise/Training_big.png", big)
    small = np.full((30, 40), CLASS_BASE[1], np.uint8)
    small[::2] += 10  # not blank
    save_image(tree.root / "train/disgust/Training_small.png", small)
    out = tmp_path / "out"

    with pytest.raises(BadItem) as err:
        run_pack(tree.root, out)
    msg = one_line(str(err.value))
    assert "Training_big.png" in msg or "Training_small.png" in msg
    assert "48x48" in msg and "--resize" in msg
    assert_nothing_written(out)

    manifest, _ = run_pack(tree.root, out, resize=True)
    train = split_contents(out)["train"]
    label, img = train["train/surprise/Training_big.png"]
    assert label == 5 and img.shape == (48, 48)
    expected = big.reshape(48, 2, 48, 2).mean(axis=(1, 3))  # a 2x area average, as antialiased bilinear does
    assert np.abs(img - expected).mean() < 6
    label, img = train["train/disgust/Training_small.png"]
    assert label == 1 and img.shape == (48, 48)
    assert abs(float(img.mean()) - small.mean()) < 3


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_colour_images_become_gray(tmp_path, suffix):
    tree = png_tree(tmp_path / "src", {"angry": 2}, prefix="Training_")
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[:24, :, 1] = 160  # two colour bands
    path = tree.root / f"train/happy/Training_rgb{suffix}"
    save_image(path, rgb, "RGB")
    assert Image.open(path).mode == "RGB"
    out = tmp_path / "out"
    run_pack(tree.root, out)
    label, img = split_contents(out)["train"][f"train/happy/Training_rgb{suffix}"]
    assert label == 3
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # ITU-R 601
    assert np.abs(img[4:20].astype(float) - luma[4:20]).max() < 4
    assert np.abs(img[28:44].astype(float) - luma[28:44]).max() < 4


# ----------------------------------------------------------------------------- bad inputs

def _corrupt(root: Path) -> str:
    rel = "train/fear/Training_corrupt.jpg"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"this is not a JPEG file at all")
    return rel


def _truncated(root: Path) -> str:
    rel = "test/sad/PublicTest_truncated.jpg"
    save_image(root / rel, class_image(4, rel))
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 2])
    return rel


def _wrong_size(root: Path) -> str:
    rel = "train/angry/Training_big.png"
    save_image(root / rel, class_image(0, rel, side=64))
    return rel


def _not_an_image(root: Path) -> str:
    rel = "train/angry/notes.txt"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("hello")
    return rel


@pytest.mark.parametrize("make_bad, reason", [
    (_corrupt, "corrupt"),
    (_truncated, "corrupt"),
    (_wrong_size, "64x64"),
    (_not_an_image, "not an image"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_image_fails_naming_the_file_and_writes_nothing(kaggle: Tree, tmp_path, make_bad, reason, workers):
    rel = make_bad(kaggle.root)
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(kaggle.root, out, workers=workers)
    msg = one_line(str(err.value))
    assert str(kaggle.root / rel) in msg
    assert reason in msg
    assert_nothing_written(out)


@pytest.mark.parametrize("make_bad", [_corrupt, _truncated, _wrong_size, _not_an_image])
def test_skip_bad_skips_and_lists_each_bad_item(kaggle: Tree, tmp_path, make_bad):
    rels = [make_bad(kaggle.root)]
    rels.append(_corrupt(kaggle.root) if make_bad is not _corrupt else _wrong_size(kaggle.root))
    out = tmp_path / "out"
    manifest, _ = run_pack(kaggle.root, out, skip_bad=True)
    skipped = {s["source"]: s["error"] for s in manifest["skipped"]}
    assert set(skipped) == set(rels)
    assert all(skipped.values())
    got = split_contents(out)
    for split in SPLITS:
        assert set(got[split]) == kaggle.ids_in(split)  # the good ones, all of them, nothing else
    assert verify(out) == len(kaggle.labels)


def test_unknown_class_folder_lists_the_valid_names(kaggle: Tree, tmp_path):
    save_image(kaggle.root / "train/joy/Training_j.png", class_image(3, "joy"))
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(kaggle.root, out)
    msg = one_line(str(err.value))
    assert "joy" in msg and str(kaggle.root / "train" / "joy") in msg
    for name in FER2013_CLASSES:
        assert name in msg
    assert_nothing_written(out)


def test_stray_file_beside_class_folders_is_refused(kaggle: Tree, tmp_path):
    (kaggle.root / "train" / "README.txt").write_text("x")
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(kaggle.root, out)
    assert "README.txt" in one_line(str(err.value))
    assert_nothing_written(out)


def test_hidden_files_and_folders_are_ignored(kaggle: Tree, tmp_path):
    (kaggle.root / "train" / ".DS_Store").write_text("x")
    (kaggle.root / "train" / "HAPPY" / ".hidden.png").write_text("x")
    (kaggle.root / "test" / ".cache" / "junk").mkdir(parents=True)
    manifest, _ = run_pack(kaggle.root, tmp_path / "out")
    assert sum(e["count"] for e in manifest["splits"].values()) == len(kaggle.labels)


@pytest.mark.parametrize("layout", ["no_top_folders", "empty_class_folders", "nothing"])
def test_empty_source_is_refused(tmp_path, layout):
    src = tmp_path / "src"
    src.mkdir()
    if layout == "no_top_folders":
        save_image(src / "happy" / "Training_1.png", class_image(3, "x"))
    elif layout == "empty_class_folders":
        (src / "train" / "happy").mkdir(parents=True)
        (src / "test" / "sad").mkdir(parents=True)
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(src, out)
    msg = one_line(str(err.value))
    assert str(src) in msg
    assert_nothing_written(out)


def test_every_image_skipped_is_refused(tmp_path):
    src = tmp_path / "src"
    _corrupt(src)
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(src, out, skip_bad=True)
    assert "no usable images" in one_line(str(err.value))
    assert_nothing_written(out)


def test_missing_source_and_bad_options_are_refused(kaggle: Tree, tmp_path):
    out = tmp_path / "out"
    cases = [
        (dict(src=tmp_path / "nope"), "no such file"),
        (dict(format="parquet"), "--format"),
        (dict(format="csv"), "--format csv"),
        (dict(val_fraction=0.0), "--val-fraction"),
        (dict(val_fraction=1.0), "--val-fraction"),
        (dict(shard_size=0), "--shard-size"),
        (dict(ferplus=str(tmp_path / "fer2013new.csv")), "--ferplus"),
    ]
    for opts, needle in cases:
        src = opts.pop("src", kaggle.root)
        with pytest.raises(PackError) as err:
            run_pack(src, out, **opts)
        assert needle in one_line(str(err.value)), opts
        assert_nothing_written(out)


# ----------------------------------------------------------------------------- duplicates

@pytest.fixture
def dup_tree(tmp_path) -> tuple[Tree, dict[str, str]]:
    tree = png_tree(tmp_path / "src", {c: 2 for c in FER2013_CLASSES}, prefix="Training_")
    png_tree(tmp_path / "src", {"angry": 2, "happy": 2}, top="test", prefix="PublicTest_", start=100)
    png_tree(tmp_path / "src", {"sad": 2, "fear": 2}, top="test", prefix="PrivateTest_", start=200)
    tree = Tree(tree.root)  # records only the duplicate/blank images added below
    x, y, z = class_image(0, "X"), class_image(3, "Y"), class_image(4, "Z")
    blank = np.full((48, 48), 128, np.uint8)
    blank[0, 0] = 130  # near-blank, not exactly constant
    names = {
        "within_a": tree.add("train/angry/Training_dupa.png", 0, "train", x),
        "within_b": tree.add("train/angry/Training_dupb.png", 0, "train", x),
        "cross_train": tree.add("train/happy/Training_dupc.png", 3, "train", y),
        "cross_val": tree.add("test/happy/PublicTest_dupd.png", 3, "val", y),
        "conflict_train": tree.add("train/sad/Training_dupe.png", 4, "train", z),
        "conflict_test": tree.add("test/fear/PrivateTest_dupf.png", 2, "test", z),
        "blank_train": tree.add("train/neutral/Training_blank.png", 6, "train", blank),
        "blank_val": tree.add("test/neutral/PublicTest_blank.png", 6, "val", np.zeros((48, 48), np.uint8)),
    }
    return tree, names


def test_duplicates_report(dup_tree, tmp_path):
    tree, n = dup_tree
    name = {k: f"{tree.splits[rel]}:{rel}" for k, rel in n.items()}  # how the report names an image
    manifest, _ = run_pack(tree.root, tmp_path / "out")
    report = manifest["duplicates"]
    groups = [frozenset(g) for g in report["groups"]]
    expected = {frozenset({name["within_a"], name["within_b"]}),
                frozenset({name["cross_train"], name["cross_val"]}),
                frozenset({name["conflict_train"], name["conflict_test"]})}
    assert set(groups) == expected and len(groups) == 3
    cross = {groups[k] for k in report["cross_split_groups"]}
    assert cross == {frozenset({name["cross_train"], name["cross_val"]}),
                     frozenset({name["conflict_train"], name["conflict_test"]})}
    conflicting = {groups[k] for k in report["conflicting_label_groups"]}
    assert conflicting == {frozenset({name["conflict_train"], name["conflict_test"]})}
    assert set(report["near_blank"]) == {name["blank_train"], name["blank_val"]}
    assert report["summary"] == {"groups": 3, "images_in_groups": 6, "cross_split_groups": 2,
                                 "conflicting_label_groups": 1, "near_blank": 2}
    assert "removed" not in report
    # Without --dedupe everything is kept.
    got = split_contents(tmp_path / "out")
    assert {n[k] for k in n} <= set(got["train"]) | set(got["val"]) | set(got["test"])


def test_dedupe_drops_leaking_and_blank_train_images_only(dup_tree, tmp_path):
    tree, n = dup_tree
    out = tmp_path / "out"
    manifest, _ = run_pack(tree.root, out, dedupe=True)
    got = split_contents(out)
    all_rel = {p.relative_to(tree.root).as_posix() for p in tree.root.rglob("*.png")}
    removed = {n["cross_train"], n["conflict_train"], n["blank_train"]}
    assert set(manifest["duplicates"]["removed"]) == {f"train:{r}" for r in removed}
    kept = set(got["train"]) | set(got["val"]) | set(got["test"])
    assert kept == all_rel - removed
    # val and test are the standard sets, untouched; within-train duplicates stay.
    assert n["cross_val"] in got["val"] and n["blank_val"] in got["val"]
    assert n["conflict_test"] in got["test"]
    assert n["within_a"] in got["train"] and n["within_b"] in got["train"]
    assert manifest["splits"]["train"]["count"] == len(got["train"])
    assert verify(out) == len(kept)


# ----------------------------------------------------------------------------- idempotent and atomic

def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}


def test_second_pack_is_a_no_op_and_force_rebuilds(kaggle: Tree, tmp_path):
    out = tmp_path / "out"
    first, built = run_pack(kaggle.root, out, shard_size=10)
    assert built
    before, inode = _snapshot(out), out.stat().st_ino
    again, built = run_pack(kaggle.root, out, shard_size=10)
    assert built is False
    assert again == first
    assert _snapshot(out) == before and out.stat().st_ino == inode

    rebuilt, built = run_pack(kaggle.root, out, shard_size=10, force=True)
    assert built
    assert out.stat().st_ino != inode  # a new directory was swapped in
    after = _snapshot(out)
    assert set(after) == set(before)
    assert all(after[k][1] != before[k][1] for k in after)  # every file written anew
    assert [s["sha256"] for s in rebuilt["splits"]["train"]["shards"]] == \
           [s["sha256"] for s in first["splits"]["train"]["shards"]]  # same source, same seed: same bytes
    assert partials_beside(out) == [] and list(tmp_path.glob(".out.old-*")) == []


def test_changed_source_or_options_rebuild(kaggle: Tree, tmp_path):
    out = tmp_path / "out"
    first, _ = run_pack(kaggle.root, out)
    kaggle.add("train/happy/Training_new.png", 3, "train")
    second, built = run_pack(kaggle.root, out)
    assert built
    assert second["source"]["fingerprint"] != first["source"]["fingerprint"]
    assert second["splits"]["train"]["count"] == first["splits"]["train"]["count"] + 1
    assert "train/happy/Training_new.png" in split_contents(out)["train"]

    # Same file list, new contents (size/mtime change): rebuilt too.
    save_image(kaggle.root / "train/happy/Training_new.png", class_image(3, "changed"))
    os.utime(kaggle.root / "train/happy/Training_new.png", ns=(1, 1))
    third, built = run_pack(kaggle.root, out)
    assert built
    np.testing.assert_array_equal(split_contents(out)["train"]["train/happy/Training_new.png"][1],
                                  class_image(3, "changed"))
    _, built = run_pack(kaggle.root, out, seed=1)  # other options: another pack
    assert built
    _, built = run_pack(kaggle.root, out, seed=1)
    assert built is False


def test_refuses_to_overwrite_a_directory_that_is_not_a_pack(kaggle: Tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(PackError) as err:
        run_pack(kaggle.root, out)
    assert str(out) in one_line(str(err.value))
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert partials_beside(out) == []


def test_packs_into_an_existing_empty_directory(kaggle: Tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _, built = run_pack(kaggle.root, out)
    assert built and verify(out) == len(kaggle.labels)


def test_a_failed_repack_leaves_the_previous_pack_intact(kaggle: Tree, tmp_path):
    out = tmp_path / "out"
    run_pack(kaggle.root, out)
    before = _snapshot(out)
    _corrupt(kaggle.root)
    with pytest.raises(PackError):
        run_pack(kaggle.root, out)
    assert _snapshot(out) == before
    assert verify(out) == len(kaggle.labels)
    assert partials_beside(out) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("out_name", ["shards", "fer-shards.v2"])
def test_stale_partials_of_dead_packs_are_removed(tmp_path, out_name):
    out = tmp_path / out_name
    dead = tmp_path / f".{out_name}.partial-{_dead_pid()}-abc123"
    alive = tmp_path / f".{out_name}.partial-{os.getpid()}-def456"
    other = tmp_path / f".other.partial-{_dead_pid()}-xyz"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "train-0.h5").write_bytes(b"x")
    staging.remove_stale_partials(out)
    assert not dead.exists()
    assert alive.exists()  # a pack still running (here: this process) keeps its work
    assert other.exists()  # another output's partials are not ours to touch


def test_an_interrupt_that_python_swallows_still_stops_the_pack(kaggle: Tree, tmp_path, monkeypatch, capsys,
                                                                signal_policy):
    """A signal whose KeyboardInterrupt lands in a __del__/weakref callback is dropped by Python
    ("Exception ignored in ..."); under the CLI's signal policy pack must still stop before
    publishing anything."""
    real_decode = pack_module.folders.decode_images

    class RaisesSignalWhenCollected:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # the handler runs here; its exception is dropped

    def decode(*args, **kwargs):
        obj = RaisesSignalWhenCollected()
        del obj
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(pack_module.folders, "decode_images", decode)
    before_handler, before_hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_pack(kaggle.root, out)
    assert_nothing_written(out)
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before_handler  # pack itself installs no handlers
    assert sys.unraisablehook is before_hook


def test_sigterm_during_a_pack_in_process_cleans_up(kaggle: Tree, tmp_path, monkeypatch, signal_policy):
    real_write = pack_module.write_shard
    calls = []

    def write_shard(out_dir, *args, **kwargs):
        calls.append(out_dir)
        if len(calls) == 2:  # train written, val next: interrupted midway
            signal.raise_signal(signal.SIGTERM)  # to this thread: the handler runs right here
        return real_write(out_dir, *args, **kwargs)

    monkeypatch.setattr(pack_module, "write_shard", write_shard)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_pack(kaggle.root, out)
    assert calls and calls[0].name.startswith(".out.partial-")
    assert_nothing_written(out)


def test_ctrl_c_in_a_library_pack_without_the_signal_policy_cleans_up(kaggle: Tree, tmp_path, monkeypatch):
    """pack() called directly (no cli.main): Ctrl-C is Python's own KeyboardInterrupt, and the
    staging cleanup runs on it all the same; pack installs no handlers of its own."""
    real_write = pack_module.write_shard
    calls = []

    def write_shard(out_dir, *args, **kwargs):
        calls.append(out_dir)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # Python's default_int_handler raises here
        return real_write(out_dir, *args, **kwargs)

    monkeypatch.setattr(pack_module, "write_shard", write_shard)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_pack(kaggle.root, out)
    assert len(calls) == 2 and calls[0].name.startswith(".out.partial-")
    assert_nothing_written(out)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook) == before


def test_the_signal_policy_is_a_no_op_off_the_main_thread(monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook
    thread = threading.Thread(target=interrupts.install_signal_policy)
    thread.start()
    thread.join()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook) == before
