"""Shared helpers for the pack/shard tests: tiny made-up FER2013 sources.

Every image is "constant-ish": a per-class base grey level plus seeded noise, so
  * its class can be read back from its mean even after lossy JPEG,
  * no two images are equal (no accidental duplicate groups),
  * its pixel std (~9) is far above the near-blank threshold.
PNG files round-trip exactly; JPEG files only approximately.
"""
from __future__ import annotations

import os
import signal

import torch

# Triton picks its CPU interpreter when kernels.triton_augment is imported (@triton.jit runs then),
# so without a GPU the variable must be set before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import csv
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.classes import FER2013_CLASSES, SPLITS


# A suite started in the background by a non-interactive shell (`make test &`, some CI runners)
# inherits SIGINT ignored, and so does every process it starts: the Ctrl-C tests would then send
# a signal that nobody hears. The tests stand for a user at a terminal, where Ctrl-C works.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SIDE = 48
# One base grey level per FER2013 class index; 35 apart so noise of +-15 never blurs them.
CLASS_BASE = (20, 55, 90, 125, 160, 195, 230)
USAGE_OF_SPLIT = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


def class_image(label: int, key: str, side: int = SIDE) -> np.ndarray:
    """A unique uint8 image whose mean identifies `label` (seeded by `key`)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    noise = rng.integers(-15, 16, (side, side))
    return np.clip(CLASS_BASE[label] + noise, 0, 255).astype(np.uint8)


def label_from_pixels(img: np.ndarray) -> int:
    """Inverse of class_image: the class whose base level is nearest the image mean."""
    return int(np.argmin([abs(float(img.mean()) - b) for b in CLASS_BASE]))


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, "JPEG", quality=95)
    else:
        img.save(path, "PNG")


@dataclass
class Tree:
    """A written image-folder source: expected label / split / pixels per id (relative path)."""

    root: Path
    labels: dict[str, int] = field(default_factory=dict)
    splits: dict[str, str | None] = field(default_factory=dict)  # None: unprefixed train (val decided by pack)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, rel: str, label: int, split: str | None, array: np.ndarray | None = None) -> str:
        array = class_image(label, rel) if array is None else array
        save_image(self.root / rel, array)
        self.labels[rel], self.splits[rel], self.pixels[rel] = label, split, array
        return rel

    def ids_in(self, split: str) -> set[str]:
        return {r for r, s in self.splits.items() if s == split}


def write_tree(root: Path, files: list[tuple[str, str, str, int]], folder_case=str) -> Tree:
    """files: (top, class name, file name, label) -> images on disk; split from the prefix."""
    tree = Tree(root)
    for top, cls, name, label in files:
        usage = name.split("_", 1)[0]
        split = {v: k for k, v in USAGE_OF_SPLIT.items()}.get(usage)
        if split is None:
            split = "test" if top == "test" else None
        tree.add(f"{top}/{folder_case(cls)}/{name}", label, split)
    return tree


def kaggle_tree(root: Path, n_train: int = 4, n_public: int = 2, n_private: int = 2) -> Tree:
    """The Kaggle layout with all three prefixes: train/ holds Training_*, test/ holds
    PublicTest_* and PrivateTest_*. Class folders in mixed case; png and jpg mixed."""
    files = []
    k = 0
    for label, cls in enumerate(FER2013_CLASSES):
        folder = cls.upper() if label % 2 else cls.capitalize()
        for i in range(n_train):
            ext = "png" if i % 2 == 0 else "jpg"
            files.append(("train", folder, f"Training_{k}.{ext}", label)); k += 1
        for i in range(n_public):
            files.append(("test", folder, f"PublicTest_{k}.png", label)); k += 1
        for i in range(n_private):
            files.append(("test", folder, f"PrivateTest_{k}.png", label)); k += 1
    return write_tree(root, files)


def png_tree(root: Path, per_class: dict[str, int], top: str = "train", prefix: str = "",
             start: int = 0) -> Tree:
    """Lossless images under root/top/<class>/<prefix><i>.png; per_class: class -> count."""
    tree = Tree(root)
    k = start
    for cls, n in per_class.items():
        label = FER2013_CLASSES.index(cls)
        for _ in range(n):
            usage = prefix.split("_", 1)[0]
            split = {v: s for s, v in USAGE_OF_SPLIT.items()}.get(usage) or ("test" if top == "test" else None)
            tree.add(f"{top}/{cls}/{prefix}{k}.png", label, split)
            k += 1
    return tree


# ----------------------------------------------------------------------------- CSV sources

def pixel_string(array: np.ndarray) -> str:
    return " ".join(str(int(v)) for v in array.ravel())


@dataclass
class CsvSource:
    path: Path
    rows: list[tuple[int, str, np.ndarray]]  # (emotion, usage, pixels) in file order; line = index + 2


def write_fer_csv(path: Path, rows: list[tuple], variant: str = "fer2013") -> Path:
    """rows: (emotion, usage, pixels) where pixels is an array or a raw string.

    variant "fer2013": header `emotion,pixels,Usage`;
    variant "icml":    header `emotion, Usage, pixels` (icml_face_data.csv).
    """
    lines = ["emotion,pixels,Usage" if variant == "fer2013" else "emotion, Usage, pixels"]
    for emotion, usage, pixels in rows:
        pix = pixels if isinstance(pixels, str) else pixel_string(pixels)
        if variant == "fer2013":
            lines.append(f"{emotion},{pix},{usage}")
        else:
            lines.append(f"{emotion}, {usage}, {pix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_rows(per_split: dict[str, int] | None = None) -> list[tuple[int, str, np.ndarray]]:
    """Valid rows cycling through the 7 classes: per_split maps split -> row count."""
    per_split = per_split or {"train": 14, "val": 7, "test": 7}
    rows = []
    for split, n in per_split.items():
        for i in range(n):
            label = i % len(FER2013_CLASSES)
            rows.append((label, USAGE_OF_SPLIT[split], class_image(label, f"csv-{split}-{i}")))
    return rows


FERPLUS_HEADER = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger",
                  "disgust", "fear", "contempt", "unknown", "NF"]


def write_ferplus(path: Path, rows: list[tuple[str, str, list[int]]]) -> Path:
    """rows: (usage, image name, 10 vote counts in FER+ column order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FERPLUS_HEADER)
        for usage, name, votes in rows:
            assert len(votes) == 10
            w.writerow([usage, name, *votes])
    return path


# ----------------------------------------------------------------------------- assertions

def partials_beside(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert partials_beside(out) == [], f"temporary dirs left: {partials_beside(out)}"
    assert list(out.parent.glob(f".{out.name}.old-*")) == []


def one_line(message: str) -> str:
    message = message.strip()
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert "Traceback" not in message
    return message


def shard_split_of(name: str) -> str:
    split = name.rsplit("-", 1)[0]
    assert split in SPLITS
    return split


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def kaggle(tmp_path) -> Tree:
    return kaggle_tree(tmp_path / "fer")


@pytest.fixture
def fer_csv(tmp_path) -> CsvSource:
    rows = csv_rows()
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    return CsvSource(path, rows)


@pytest.fixture
def icml_csv(tmp_path) -> CsvSource:
    rows = csv_rows({"train": 7, "val": 7, "test": 7})
    path = write_fer_csv(tmp_path / "icml_face_data.csv", rows, variant="icml")
    return CsvSource(path, rows)



@pytest.fixture
def signal_policy(monkeypatch):
    """The CLI's signal policy (SIGTERM -> KeyboardInterrupt, swallowed signals kept) in this
    process, as `facesense.cli.main` installs it; handlers and hook are put back afterwards."""
    import signal
    import sys

    from pipeline import interrupts

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(interrupts, "_previous_hook", interrupts._previous_hook)
    monkeypatch.setattr(interrupts, "_swallowed", [])
    interrupts.install_signal_policy()
    assert signal.getsignal(signal.SIGTERM) is interrupts._raise  # else a test's SIGTERM would kill pytest
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
