"""RAF-DB's "basic" layout: SRC/EmoLabel/list_patition_label.txt and SRC/Image/{aligned,original}/.

Each line of the label file is `<name> <label>`, e.g. `train_00001.jpg 5`. Labels 1..7 are
RAF-DB's own (surprise, fear, disgust, happiness, sadness, anger, neutral) and keep that
order (label - 1). `train_*` files are train (pack carves the seeded stratified val slice
from them), `test_*` files are test. The image of `train_00001.jpg` is
Image/aligned/train_00001_aligned.jpg (100x100 colour faces, the default) or
Image/original/train_00001.jpg (`--raf-images original`, whole pictures of any size).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.classes import RAFDB_CLASSES, SPLITS
from pipeline.errors import PackError, clip
from pipeline.folders import FolderScan
from pipeline.imagefolders import TRAIN_UNDECIDED

LABEL_FILE = "EmoLabel/list_patition_label.txt"  # RAF-DB's own spelling
IMAGE_SETS = ("aligned", "original")


def is_rafdb(src: Path) -> bool:
    return (src / LABEL_FILE).is_file()


def image_path(name: str, images: str) -> str:
    """The image file (relative to SRC) of a label-file name."""
    if images == "aligned":
        stem, dot, suffix = name.rpartition(".")
        return f"Image/aligned/{stem}_aligned.{suffix}" if dot else f"Image/aligned/{name}_aligned"
    return f"Image/original/{name}"


def scan_rafdb(src: Path, images: str = "aligned") -> FolderScan:
    """The listed images with labels and splits; PackError naming file:line for a bad line.

    A listed image that is missing is a bad item (one line naming the label file's line;
    --skip-bad skips it): `bad` holds it for pack to raise or skip.
    """
    if images not in IMAGE_SETS:
        raise PackError(f"--raf-images {images!r}: expected aligned or original")
    label_file = src / LABEL_FILE
    image_dir = src / "Image" / images
    try:
        text = label_file.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        raise PackError(f"{label_file}: cannot read ({exc.strerror})") from exc
    if not image_dir.is_dir():
        raise PackError(f"{image_dir}: not found; RAF-DB's {images} images belong there "
                        f"(or pass --raf-images {'original' if images == 'aligned' else 'aligned'})")
    present = {entry.name for entry in os.scandir(image_dir)}  # one listing, not a stat per image
    paths, labels, splits, bad = [], [], [], []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}:{line_no}"
        if len(fields) != 2:
            raise PackError(f"{where}: expected '<image name> <label>' (e.g. 'train_00001.jpg 5'), "
                            f"got {clip(line.strip())!r}")
        name, label = fields
        if not (label.isdigit() and 1 <= int(label) <= len(RAFDB_CLASSES)):
            raise PackError(f"{where}: label {clip(label)!r} outside 1..7 (RAF-DB basic: "
                            f"{', '.join(f'{k} {c}' for k, c in enumerate(RAFDB_CLASSES, 1))})")
        if name in first_line:
            raise PackError(f"{where}: {clip(name)!r} is listed again (first on line {first_line[name]})")
        first_line[name] = line_no
        split = ("train" if name.startswith("train_") else "test" if name.startswith("test_") else None)
        if split is None or "/" in name or name.startswith("."):
            raise PackError(f"{where}: image name {clip(name)!r} starts with neither train_ nor test_")
        rel = image_path(name, images)
        if rel.rsplit("/", 1)[1] not in present:
            bad.append((rel, f"listed on {where} but not found"))
            continue
        paths.append(rel)
        labels.append(int(label) - 1)
        splits.append(TRAIN_UNDECIDED if split == "train" else SPLITS.index("test"))
    if not paths and not bad:
        raise PackError(f"{label_file}: lists no images")
    order = {"source": "rafdb", "detail": "RAF-DB basic labels 1..7 in RAF-DB's order: "
                                          + ", ".join(f"{k} {c}" for k, c in enumerate(RAFDB_CLASSES, 1))}
    return FolderScan(paths, np.array(labels, np.uint8), np.array(splits, np.uint8), bad, RAFDB_CLASSES, order,
                      label_file)
