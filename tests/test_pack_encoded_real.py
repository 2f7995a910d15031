"""Integration: the real FER2013 folders (../shared/fer2013) packed --store encoded, against a raw pack.

Skipped when the folder is absent. The encoded shards must hold every file's bytes unchanged,
and decoding them (pipeline.decode, what the loaders use) must give the raw pack's pixels
within TOLERANCE. Measured here: max abs difference 0 (the same Pillow/libjpeg decodes both);
a decoder built on another libjpeg (nvJPEG, DALI) may differ by a few levels, which is why
the loaders' own tests carry their own tolerance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.decode import DecodePool
from pipeline.pack import PackOptions, pack
from pipeline.shards import read_split, verify

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "fer2013"
TOLERANCE = 0  # max abs difference, raw pack vs decoded encoded pack, same decoder


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    if not (DATA / "train").is_dir():
        pytest.skip(f"real FER2013 not present at {DATA.resolve()}")
    root = tmp_path_factory.mktemp("real-encoded")
    raw, _ = pack(DATA, root / "raw", PackOptions(store="raw"), workers=2, show_progress=False)
    encoded, _ = pack(DATA, root / "encoded", PackOptions(store="encoded"), workers=2, show_progress=False)
    return root, raw, encoded


def test_encoded_manifest_and_counts_match_the_raw_pack(packs):
    root, raw, encoded = packs
    assert encoded["storage"]["requested"] == "encoded"
    for split in ("train", "val", "test"):
        r, e = raw["splits"][split], encoded["splits"][split]
        assert e["count"] == r["count"] and e["class_counts"] == r["class_counts"]
        assert e["storage"] == "encoded" and r["storage"] == "raw"
        assert e["channels"] == r["channels"] == 1
        if e["count"]:
            assert e["image_shape"] == r["image_shape"] == [48, 48]
            assert e["decoded_bytes"] == r["decoded_bytes"] == e["count"] * 48 * 48
    assert encoded["duplicates"]["summary"]["groups"] == raw["duplicates"]["summary"]["groups"]
    assert verify(root / "encoded") == raw["splits"]["train"]["count"] + raw["splits"]["val"]["count"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_encoded_bytes_are_the_files_and_decode_to_the_raw_pixels(packs, split):
    root, _, _ = packs
    raw = read_split(root / "raw", split, with_ids=True)
    enc = read_split(root / "encoded", split, with_ids=True)
    assert raw.ids == enc.ids and (raw.labels == enc.labels).all()
    blobs = enc.encoded.read(np.arange(len(enc.labels)))
    for k in range(0, len(blobs), 997):  # a spread of files, byte for byte
        assert blobs[k].tobytes() == (DATA / enc.ids[k]).read_bytes()
    assert (enc.encoded.shapes == [48, 48, 1]).all()
    pool = DecodePool(2)
    try:
        decoded = pool.decode_batch(blobs, 1, (48, 48))
    finally:
        pool.close()
    diff = np.abs(decoded.astype(np.int16) - raw.images).max()
    assert diff <= TOLERANCE, f"max abs difference {diff}"
