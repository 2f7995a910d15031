"""The shard format, manifest, reader (whole split and DDP rank parts) and verify."""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import csv_rows, kaggle_tree, one_line, write_fer_csv
from pipeline.classes import FER2013_CLASSES, SPLITS
from pipeline.errors import ShardError
from pipeline.pack import PackOptions, pack
from pipeline.shards import FORMAT_VERSION, MANIFEST, load_manifest, rank_range, read_split, sha256_file, verify

SHARD_SIZE = 5


@pytest.fixture
def packed(tmp_path) -> Path:
    """A pack with several shards per split: train 42, val 14, test 14 images, at most 5 per shard."""
    tree = kaggle_tree(tmp_path / "src", n_train=6, n_public=2, n_private=2)
    out = tmp_path / "shards"
    pack(tree.root, out, PackOptions(shard_size=SHARD_SIZE), workers=1, show_progress=False)
    return out


def flip_byte_in_images(path: Path, index: int = 0) -> None:
    """Flip one byte inside the first chunk of the `images` dataset, in place."""
    with h5py.File(path, "r") as f:
        offset = f["images"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + index)
        byte = fh.read(1)[0]
        fh.seek(offset + index)
        fh.write(bytes([byte ^ 0xFF]))


def rewrite_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- format

def test_shard_files_datasets_and_attributes(packed: Path):
    manifest = load_manifest(packed)
    files = sorted(p.name for p in packed.iterdir())
    listed = sorted(s["file"] for e in manifest["splits"].values() for s in e["shards"])
    assert files == sorted(listed + [MANIFEST])  # nothing else in the directory
    for split in SPLITS:
        entry = manifest["splits"][split]
        shards = entry["shards"]
        assert [s["file"] for s in shards] == [f"{split}-{k}.h5" for k in range(len(shards))]
        assert len(shards) == -(-entry["count"] // SHARD_SIZE)
        assert all(s["count"] == SHARD_SIZE for s in shards[:-1]) and 1 <= shards[-1]["count"] <= SHARD_SIZE
        assert sum(s["count"] for s in shards) == entry["count"]
        total_labels = []
        for k, s in enumerate(shards):
            assert re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) and s["sha256"] == sha256_file(packed / s["file"])
            with h5py.File(packed / s["file"], "r") as f:
                assert f["images"].dtype == np.uint8 and f["images"].shape == (s["count"], 48, 48)
                assert f["labels"].dtype == np.uint8 and f["labels"].shape == (s["count"],)
                assert f["ids"].shape == (s["count"],)
                ids = [i.decode() for i in f["ids"][...]]
                assert all(i.startswith(("train/", "test/")) for i in ids)
                assert f.attrs["format_version"] == FORMAT_VERSION
                assert f.attrs["split"] == split
                assert f.attrs["shard"] == k
                assert json.loads(f.attrs["classes"]) == list(FER2013_CLASSES)
                assert f["images"].fletcher32 and f["labels"].fletcher32
                total_labels += f["labels"][...].tolist()
        counts = np.bincount(total_labels, minlength=7)
        assert entry["class_counts"] == dict(zip(FER2013_CLASSES, counts.tolist()))


def test_manifest_contents(packed: Path):
    manifest = json.loads((packed / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["classes"] == list(FER2013_CLASSES)
    assert list(manifest["splits"]) == list(SPLITS)
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 42, "val": 14, "test": 14}
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["source"]["fingerprint"])
    assert manifest["source"]["format"] == "folders"
    assert manifest["skipped"] == []
    assert manifest["options"]["shard_size"] == SHARD_SIZE
    assert set(manifest["duplicates"]) >= {"groups", "cross_split_groups", "conflicting_label_groups",
                                           "near_blank", "summary"}


def test_all_three_splits_are_present_even_when_empty(tmp_path):
    path = write_fer_csv(tmp_path / "fer2013.csv", csv_rows({"train": 8}))
    out = tmp_path / "out"
    manifest, _ = pack(path, out, PackOptions(), workers=1, show_progress=False)
    for split in ("val", "test"):
        entry = manifest["splits"][split]
        assert entry["count"] == 0 and entry["shards"] == []
        assert entry["class_counts"] == {c: 0 for c in FER2013_CLASSES}
        arrays = read_split(out, split, with_ids=True)
        assert arrays.images.shape == (0, 48, 48) and arrays.labels.shape == (0,) and arrays.ids == []
    assert verify(out) == 8


def test_shard_order_is_shuffled_so_rank_parts_mix_classes(packed: Path):
    train = read_split(packed, "train")
    assert not np.all(np.diff(train.labels) >= 0)  # not grouped by class as the folders are
    first_half = read_split(packed, "train", rank=0, world_size=2)
    assert len(set(first_half.labels.tolist())) >= 4


# ----------------------------------------------------------------------------- reader

@pytest.mark.parametrize("split", SPLITS)
def test_rank_parts_partition_the_split(packed: Path, split):
    whole = read_split(packed, split, with_ids=True)
    assert whole.images.dtype == np.uint8 and whole.images.shape == (len(whole.ids), 48, 48)
    assert whole.classes == FER2013_CLASSES
    for world_size in range(1, 6):
        parts = [read_split(packed, split, rank=r, world_size=world_size, with_ids=True)
                 for r in range(world_size)]
        sizes = [len(p.ids) for p in parts]
        assert max(sizes) - min(sizes) <= 1, sizes
        all_ids = [i for p in parts for i in p.ids]
        assert len(all_ids) == len(set(all_ids)) == len(whole.ids)  # disjoint
        assert set(all_ids) == set(whole.ids)  # covering
        # ... and the union, in rank order, is the whole split, labels and pixels included.
        assert all_ids == whole.ids
        np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), whole.images)
        np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), whole.labels)


def test_rank_range_is_contiguous_disjoint_and_balanced():
    for count in (0, 1, 4, 5, 17, 100):
        for world_size in range(1, 9):
            ranges = [rank_range(count, r, world_size) for r in range(world_size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        rank_range(10, 2, 2)
    with pytest.raises(ValueError):
        rank_range(10, -1, 2)


def test_reader_refuses_an_unknown_split(packed: Path):
    with pytest.raises(ValueError, match="unknown split"):
        read_split(packed, "validation")


def test_ids_are_read_only_when_asked(packed: Path):
    assert read_split(packed, "val").ids is None


# ----------------------------------------------------------------------------- verify

def test_verify_passes_on_a_fresh_pack(packed: Path):
    assert verify(packed) == 70


def test_a_flipped_byte_is_caught_naming_the_shard(packed: Path):
    target = packed / "train-3.h5"
    flip_byte_in_images(target, index=100)
    with pytest.raises(ShardError) as err:
        verify(packed)
    msg = one_line(str(err.value))
    assert str(target) in msg
    assert "sha256" in msg
    # the other shards are fine: corrupting a val shard instead names that one
    flip_byte_in_images(target, index=100)  # flip back
    assert verify(packed) == 70
    flip_byte_in_images(packed / "val-1.h5", index=7)
    with pytest.raises(ShardError, match=re.escape(str(packed / "val-1.h5"))):
        verify(packed)


def test_corruption_behind_a_matching_sha256_is_caught_by_the_checksums(packed: Path):
    """A shard changed and its manifest hash updated: the HDF5 fletcher32 checksums still catch it."""
    target = packed / "test-0.h5"
    flip_byte_in_images(target, index=10)
    rewrite_manifest(packed, lambda m: m["splits"]["test"]["shards"][0].update(sha256=sha256_file(target)))
    with pytest.raises(ShardError) as err:
        verify(packed)
    assert str(target) in one_line(str(err.value))


def test_missing_shard_is_named(packed: Path):
    (packed / "val-2.h5").unlink()
    with pytest.raises(ShardError, match=re.escape(str(packed / "val-2.h5")) + ".*missing"):
        verify(packed)


def test_tampered_class_counts_are_caught(packed: Path):
    def edit(m):
        counts = m["splits"]["val"]["class_counts"]
        counts["angry"] += 1
        counts["happy"] -= 1
    rewrite_manifest(packed, edit)
    with pytest.raises(ShardError, match="val counts do not match"):
        verify(packed)


def test_a_shard_of_another_split_is_refused(packed: Path):
    (packed / "val-0.h5").unlink()
    (packed / "test-0.h5").rename(packed / "val-0.h5")
    rewrite_manifest(packed, lambda m: m["splits"]["val"]["shards"][0].update(
        sha256=sha256_file(packed / "val-0.h5"), count=5))
    with pytest.raises(ShardError, match="split 'test'"):
        read_split(packed, "val")


@pytest.mark.parametrize("version", [3, 0, "1", None])
def test_unknown_manifest_format_version_is_refused(packed: Path, version):
    def edit(m):
        if version is None:
            del m["format_version"]
        else:
            m["format_version"] = version
    rewrite_manifest(packed, edit)
    for call in (lambda: load_manifest(packed), lambda: read_split(packed, "train"), lambda: verify(packed)):
        with pytest.raises(ShardError) as err:
            call()
        msg = one_line(str(err.value))
        assert "format_version" in msg and repr(version) in msg and "re-pack" in msg
        assert str(packed / MANIFEST) in msg


def test_unknown_shard_format_version_is_refused(packed: Path):
    target = packed / "train-0.h5"
    with h5py.File(target, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ShardError) as err:
        read_split(packed, "train")
    msg = one_line(str(err.value))
    assert str(target) in msg and "format_version" in msg
    rewrite_manifest(packed, lambda m: m["splits"]["train"]["shards"][0].update(sha256=sha256_file(target)))
    with pytest.raises(ShardError, match=re.escape(str(target))):
        verify(packed)


def test_a_file_that_is_not_hdf5_is_refused(packed: Path):
    target = packed / "train-1.h5"
    target.write_bytes(b"not hdf5")
    with pytest.raises(ShardError, match=re.escape(str(target))):
        read_split(packed, "train")


@pytest.mark.parametrize("problem", ["missing", "garbage", "no_splits"])
def test_bad_manifest_is_refused(packed: Path, problem):
    path = packed / MANIFEST
    if problem == "missing":
        path.unlink()
    elif problem == "garbage":
        path.write_text("{not json")
    else:
        rewrite_manifest(packed, lambda m: m["splits"].pop("test"))
    for call in (lambda: load_manifest(packed), lambda: read_split(packed, "train"), lambda: verify(packed)):
        with pytest.raises(ShardError) as err:
            call()
        assert str(path) in one_line(str(err.value))
