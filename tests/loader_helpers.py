"""Tiny version-2 shard directories for the loader tests: raw or encoded, gray or colour, one size or many.

Images are smooth (a coarse random grid upsampled), so resampling methods that differ in detail
(DALI's one warp vs Pillow's resize) still agree closely; PNG bytes make decoding exact.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.classes import FERPLUS_CLASSES
from pipeline.shards import FORMAT_VERSION, MANIFEST, split_entry, write_shard

COUNTS = {"train": 40, "val": 13, "test": 0}


def smooth_images(rng, n: int, shapes: list[tuple[int, int]], channels: int) -> list[np.ndarray]:
    out = []
    for h, w in shapes[:n]:
        coarse = rng.integers(0, 256, (5, 5, 3) if channels == 3 else (5, 5), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        out.append(np.asarray(img))
    return out


def png(pixels: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 95) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), np.uint8)


def make_votes(rng, labels: np.ndarray) -> np.ndarray:
    """FER+-like counts: 6 votes for the label, the rest spread (some of 1: outliers FER+ drops)."""
    votes = rng.integers(0, 3, (len(labels), 10)).astype(np.uint8)
    votes[np.arange(len(labels)), labels] = 6
    return votes


def build(root: Path, *, storage: str = "raw", channels: int = 1, shape: tuple[int, int] | None = (48, 48),
          counts: dict[str, int] = COUNTS, votes: bool = False, shard_size: int = 16, seed: int = 0,
          classes=FERPLUS_CLASSES, encoder=png, corrupt: int | None = None) -> Path:
    """A shard directory as pack writes it. shape None: encoded images of differing sizes (30..70 px);
    `corrupt`: replace train image number `corrupt` by bytes that do not decode."""
    if shape is None and storage != "encoded":
        raise ValueError("raw splits have one size")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = {}
    for split, n in counts.items():
        sides = [shape] * n if shape else [tuple(int(v) for v in rng.integers(30, 71, 2)) for _ in range(n)]
        images = smooth_images(rng, n, sides, channels)
        labels = (np.arange(n) % len(classes)).astype(np.uint8)
        ids = [f"{split}/{i}.png" for i in range(n)]
        split_votes = make_votes(rng, labels) if votes else None
        shards = []
        for k, lo in enumerate(range(0, n, shard_size)):
            hi = min(n, lo + shard_size)
            common = dict(labels=labels[lo:hi], ids=ids[lo:hi], classes=tuple(classes), channels=channels,
                          votes=split_votes[lo:hi] if votes else None)
            if storage == "raw":
                shards.append(write_shard(root, split, k, images=np.stack(images[lo:hi]), **common))
            else:
                blobs = [encoder(img) for img in images[lo:hi]]
                if corrupt is not None and split == "train" and lo <= corrupt < hi:
                    blobs[corrupt - lo] = np.frombuffer(b"\x89PNG\r\n\x1a\nnot an image", np.uint8)
                shapes = [(h, w, channels) for h, w in sides[lo:hi]]
                shards.append(write_shard(root, split, k, encoded=blobs, shapes=shapes, **common))
        entries[split] = split_entry(labels, tuple(classes), shards, storage=storage, channels=channels,
                                     image_shape=list(shape) if shape else None)
    manifest = {"format_version": FORMAT_VERSION, "classes": list(classes), "splits": entries, "votes": votes,
                "storage": {"requested": storage, "why": "test"},
                "class_order": {"source": "ferplus", "detail": "test"}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def decoded_split(root: Path, split: str, size: int) -> np.ndarray:
    """The split's pixels as the loaders decode them (raw as stored, encoded by the pack's decode rule)."""
    from pipeline.decode import DecodePool, decode_side
    from pipeline.shards import read_split

    part = read_split(root, split)
    if part.images is not None:
        return part.images
    return DecodePool(1).decode_batch(part.encoded.read_all(), part.channels, decode_side(part, size))


LAYOUTS = {  # name: build() keywords
    "raw-gray": dict(storage="raw", channels=1, shape=(48, 48)),
    "raw-rgb": dict(storage="raw", channels=3, shape=(40, 56)),
    "encoded-gray": dict(storage="encoded", channels=1, shape=(48, 48)),
    "encoded-rgb": dict(storage="encoded", channels=3, shape=(40, 56)),
    "encoded-sizes": dict(storage="encoded", channels=3, shape=None),
}
