"""Integration: pack the real FER2013 image folders (../shared/fer2013) when present.

Counts come from that folder's README: Training -> train, PublicTest -> val, and the
PrivateTest third is withheld there, so test is empty.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import folders
from pipeline.classes import FER2013_CLASSES
from pipeline.pack import PackOptions, pack
from pipeline.shards import load_manifest, read_split, verify

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "fer2013"

TRAIN = {"angry": 3995, "disgust": 436, "fear": 4097, "happy": 7215, "neutral": 4965, "sad": 4830, "surprise": 3171}
VAL = {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "neutral": 607, "sad": 653, "surprise": 415}


@pytest.fixture(scope="module")
def real_pack(tmp_path_factory):
    if not (DATA / "train").is_dir():
        pytest.skip(f"real FER2013 not present at {DATA.resolve()}")
    out = tmp_path_factory.mktemp("real") / "shards"
    manifest, built = pack(DATA, out, PackOptions(), workers=2, show_progress=False)
    assert built
    return out, manifest


def test_counts_match_the_readme(real_pack):
    out, manifest = real_pack
    assert sum(TRAIN.values()) == 28_709 and sum(VAL.values()) == 3_589
    assert manifest["classes"] == list(FER2013_CLASSES)
    assert manifest["splits"]["train"]["count"] == 28_709
    assert manifest["splits"]["val"]["count"] == 3_589
    assert manifest["splits"]["test"]["count"] == 0
    assert manifest["splits"]["test"]["shards"] == []
    assert manifest["splits"]["train"]["class_counts"] == {c: TRAIN[c] for c in FER2013_CLASSES}
    assert manifest["splits"]["val"]["class_counts"] == {c: VAL[c] for c in FER2013_CLASSES}
    assert manifest["source"]["val_from_train"] is False
    assert manifest["skipped"] == []


def test_verify_passes(real_pack):
    out, _ = real_pack
    assert verify(out) == 28_709 + 3_589
    assert load_manifest(out)["format_version"] == 2


@pytest.mark.parametrize("split, top, prefix", [("train", "train", "Training_"), ("val", "test", "PublicTest_")])
def test_every_label_matches_its_class_folder(real_pack, split, top, prefix):
    out, _ = real_pack
    arrays = read_split(out, split, with_ids=True)
    folders = np.array([FER2013_CLASSES.index(i.split("/")[1].lower()) for i in arrays.ids])
    np.testing.assert_array_equal(arrays.labels, folders)
    assert all(i.startswith(f"{top}/") and i.rsplit("/", 1)[1].startswith(prefix) for i in arrays.ids)
    assert len(set(arrays.ids)) == len(arrays.ids)
    assert arrays.images.std() > 30  # real faces, not zeros


def test_real_data_duplicates_are_reported(real_pack):
    _, manifest = real_pack
    summary = manifest["duplicates"]["summary"]
    # FER2013 is known to hold exact duplicates, some across splits and with conflicting labels.
    assert summary["groups"] > 0 and summary["cross_split_groups"] > 0
    assert summary["conflicting_label_groups"] > 0 and summary["near_blank"] > 0


def test_repack_is_a_no_op(real_pack, monkeypatch):
    """Unchanged files: the stat pass says so, nothing is decoded and the shards stay as they were."""
    out, manifest = real_pack
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def decode_images(*args, **kwargs):
        raise AssertionError("an up-to-date pack decoded its source again")

    monkeypatch.setattr(folders, "decode_images", decode_images)
    again, built = pack(DATA, out, PackOptions(), workers=2, show_progress=False)
    assert built is False and again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
