"""Shard format version 2: raw colour and any size, encoded bytes, votes, lazy reads, version 1 still read."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, DecodePool, decode_image, decode_side, probe
from pipeline.errors import ShardError
from pipeline.shards import MANIFEST, load_manifest, read_split, split_entry, verify, write_shard

CLASSES = ("a", "b", "c")


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_dir(out: Path, train: dict, shard_size: int = 4, votes: bool = False) -> Path:
    """A v2 directory whose train split is `train` (write_shard kwargs for all rows); val/test empty."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(train["labels"])
    shards = []
    for k, lo in enumerate(range(0, n, shard_size)):
        rows = {key: (value[lo:lo + shard_size] if value is not None and key != "channels" else value)
                for key, value in train.items()}
        shards.append(write_shard(out, "train", k, ids=[str(i) for i in range(lo, min(n, lo + shard_size))],
                                  classes=CLASSES, **rows))
    splits = {"train": split_entry(train["labels"], CLASSES, shards)}
    for split in ("val", "test"):
        splits[split] = split_entry(np.zeros(0, int), CLASSES, [], storage=splits["train"]["storage"],
                                    channels=splits["train"]["channels"])
    (out / MANIFEST).write_text(json.dumps({"format_version": 2, "classes": list(CLASSES), "splits": splits,
                                            "votes": votes}))
    return out


@pytest.fixture
def colour_images():
    return np.random.default_rng(0).integers(0, 256, (10, 20, 30, 3), dtype=np.uint8)


def test_raw_colour_non_square_round_trip(tmp_path, colour_images):
    labels = np.arange(10) % 3
    out = write_dir(tmp_path / "d", {"images": colour_images, "labels": labels})
    entry = load_manifest(out)["splits"]["train"]
    assert (entry["storage"], entry["channels"], entry["image_shape"]) == ("raw", 3, [20, 30])
    assert entry["decoded_bytes"] == colour_images.size
    part = read_split(out, "train")
    assert part.storage == "raw" and part.channels == 3 and part.image_shape == (20, 30)
    assert (part.images == colour_images).all() and (part.labels == labels).all()
    assert verify(out) == 10


def test_encoded_bytes_are_stored_unchanged_and_read_lazily(tmp_path, colour_images):
    blobs = [png(a) for a in colour_images]
    blobs[3] = png(colour_images[3][:10])  # one image of another size
    shapes = np.array([probe(b) for b in blobs])
    votes = np.random.default_rng(1).integers(0, 10, (10, 10), dtype=np.uint8)
    out = write_dir(tmp_path / "d", {"encoded": blobs, "shapes": shapes, "labels": np.arange(10) % 3,
                                     "channels": 3, "votes": votes}, votes=True)
    entry = load_manifest(out)["splits"]["train"]
    assert (entry["storage"], entry["channels"], entry["image_shape"]) == ("encoded", 3, None)
    part = read_split(out, "train", rank=1, world_size=2)  # rows 5..9
    assert part.images is None and part.storage == "encoded" and len(part.encoded) == 5
    assert (part.votes == votes[5:]).all() and (part.encoded.shapes == shapes[5:]).all()
    got = part.encoded.read([4, 0, 0, 2])  # any order, repeats
    assert [bytes(g) for g in got] == [blobs[9], blobs[5], blobs[5], blobs[7]]
    assert [bytes(g) for g in pickle.loads(pickle.dumps(part.encoded)).read_all()] == blobs[5:]
    assert decode_side(part, 64) == (64, 64)  # sizes differ: the loader decodes to its output size
    assert verify(out) == 10


def test_lazy_raw_reads_rows_on_demand(tmp_path, colour_images):
    out = write_dir(tmp_path / "d", {"images": colour_images, "labels": np.arange(10) % 3})
    part = read_split(out, "train", lazy=True)
    assert part.images is None and part.rows is not None
    assert (part.rows.read([9, 1, 4]) == colour_images[[9, 1, 4]]).all()
    assert (part.rows.read_all() == colour_images).all()
    assert decode_side(part, 64) == (20, 30)


def test_version_1_directories_are_still_read(tmp_path):
    out = tmp_path / "v1"
    out.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    with h5py.File(out / "train-0.h5", "w") as f:  # a version-1 shard: no storage or channels attributes
        f.create_dataset("images", data=images)
        f.create_dataset("labels", data=np.array([0, 1, 2, 0], np.uint8))
        f.create_dataset("ids", data=np.array(list("wxyz"), dtype=object), dtype=h5py.string_dtype())
        f.attrs.update(magic="facesense-shards", format_version=1, split="train", shard=0,
                       classes=json.dumps(list(CLASSES)))
    from pipeline.shards import sha256_file
    shard = {"file": "train-0.h5", "count": 4, "sha256": sha256_file(out / "train-0.h5")}
    empty = {"count": 0, "class_counts": {c: 0 for c in CLASSES}, "shards": []}
    splits = {"train": {"count": 4, "class_counts": {"a": 2, "b": 1, "c": 1}, "shards": [shard]},
              "val": empty, "test": empty}
    (out / MANIFEST).write_text(json.dumps({"format_version": 1, "classes": list(CLASSES), "splits": splits}))
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["image_shape"] == [48, 48] and manifest["votes"] is False
    assert (read_split(out, "train").images == images).all()
    assert verify(out) == 4


def test_unknown_versions_and_mismatched_storage_are_refused(tmp_path, colour_images):
    out = write_dir(tmp_path / "d", {"images": colour_images, "labels": np.arange(10) % 3})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["splits"]["train"]["storage"] = "encoded"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="holds raw images with 3 channel"):
        read_split(out, "train")
    manifest["format_version"] = 3
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="format_version 3 is not supported"):
        load_manifest(out)


def test_verify_catches_a_changed_encoded_byte(tmp_path, colour_images):
    blobs = [png(a) for a in colour_images]
    out = write_dir(tmp_path / "d", {"encoded": blobs, "shapes": np.array([probe(b) for b in blobs]),
                                     "labels": np.arange(10) % 3, "channels": 3})
    path = out / "train-0.h5"
    data = bytearray(path.read_bytes())
    at = data.find(blobs[0][40:80])  # inside the first file's bytes
    assert at > 0
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256 differs"):
        verify(out)


def test_decode_rules(colour_images):
    blob = png(colour_images[0])
    assert (decode_image(blob, 3) == colour_images[0]).all()
    gray = decode_image(blob, 1)
    luma = Image.fromarray(colour_images[0]).convert("L")  # ITU-R 601, as pack has always stored
    assert gray.shape == (20, 30) and (gray == np.asarray(luma)).all()
    assert decode_image(blob, 3, size=(40, 60)).shape == (40, 60, 3)
    assert probe(blob) == (20, 30, 3)
    batch = DecodePool(2).decode_batch([blob, png(colour_images[1][:5])], 3, (20, 30))
    assert batch.shape == (2, 20, 30, 3) and (batch[0] == colour_images[0]).all()
    with pytest.raises(DecodeError, match="corrupt"):
        decode_image(blob[:50], 3)
    wide = np.full((4, 4), 65535, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    assert (decode_image(buf.getvalue(), 1) == 255).all()  # 16-bit gray scaled, not clipped
