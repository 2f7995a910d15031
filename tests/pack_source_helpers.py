"""Tiny made-up sources for the pack tests of issue 16: RAF-DB's basic layout and image-folder data sets.

Colour images carry their class in their mean colour (a per-class RGB base plus seeded
noise), so a label can be read back from the pixels even after lossy JPEG.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# One RGB base per class index (up to 8 classes), far apart.
COLOUR_BASE = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200),
               (120, 120, 120), (230, 160, 90)]


def colour_image(label: int, key: str, shape=(100, 100)) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    noise = rng.integers(-20, 21, (*shape, 3))
    return np.clip(np.array(COLOUR_BASE[label % len(COLOUR_BASE)]) + noise, 0, 255).astype(np.uint8)


def gray_image(label: int, key: str, shape=(48, 48)) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return np.clip(20 + 30 * label + rng.integers(-12, 13, shape), 0, 255).astype(np.uint8)


def label_from_colour(img: np.ndarray) -> int:
    mean = img.reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - np.array(b)).sum() for b in COLOUR_BASE]))


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pil_decode(path_or_bytes, mode: str, size=None) -> np.ndarray:
    """The plain reference: Image.open + convert (+ bilinear resize), as pack promises."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as img:
        img = img.convert(mode)
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(img)


@dataclass
class Source:
    """A written source: per id (path relative to root) its label (class index) and split (None: train/val)."""

    root: Path
    labels: dict[str, int] = field(default_factory=dict)
    splits: dict[str, str | None] = field(default_factory=dict)

    def ids_in(self, split: str) -> set[str]:
        return {i for i, s in self.splits.items() if s == split}

    def train_or_val(self) -> set[str]:
        return {i for i, s in self.splits.items() if s is None}


RAF_LABEL_FILE = "EmoLabel/list_patition_label.txt"


def raf_tree(root: Path, n_train: int = 3, n_test: int = 2, shape=(100, 100), original_shapes=None) -> Source:
    """RAF-DB's basic layout: every class (labels 1..7) with n_train train_ and n_test test_ images.

    Aligned images are shape (100x100 colour JPEGs); original images (Image/original/) are
    written too, of `original_shapes` sizes in turn (default: the aligned size).
    """
    src = Source(root)
    lines = []
    k = 0
    for label in range(1, 8):
        for split, n in (("train", n_train), ("test", n_test)):
            for _ in range(n):
                k += 1
                name = f"{split}_{k:05d}.jpg"
                lines.append(f"{name} {label}")
                rel = f"Image/aligned/{split}_{k:05d}_aligned.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(encode(colour_image(label - 1, name, shape)))
                orig_shape = original_shapes[k % len(original_shapes)] if original_shapes else shape
                (root / "Image/original").mkdir(parents=True, exist_ok=True)
                (root / "Image/original" / name).write_bytes(encode(colour_image(label - 1, "o" + name, orig_shape)))
                src.labels[rel] = label - 1
                src.splits[rel] = None if split == "train" else "test"
    (root / RAF_LABEL_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / RAF_LABEL_FILE).write_text("\n".join(lines) + "\n")
    return src


def folder_tree(root: Path, classes: list[str], splits: dict[str, int], colour: bool = True, shape=(64, 64),
                fmt: str = "JPEG") -> Source:
    """root/<split folder>/<class folder>/<i>.jpg; splits: split folder name -> images per class.

    The label recorded is the index of the class folder in `classes` (callers map it when the
    pack's class order differs).
    """
    src = Source(root)
    suffix = "jpg" if fmt == "JPEG" else "png"
    split_of = {"train": None, "val": "val", "valid": "val", "validation": "val", "test": "test"}
    for top, n in splits.items():
        for label, cls in enumerate(classes):
            for i in range(n):
                rel = f"{top}/{cls}/{cls}_{i}.{suffix}"
                array = colour_image(label, rel, shape) if colour else gray_image(label, rel, shape)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(encode(array, fmt))
                src.labels[rel] = label
                src.splits[rel] = split_of[top.lower()]
    return src
