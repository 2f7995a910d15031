"""A RAF-DB-like data set made from FER2013 faces, for the benchmarks of colour data (issue 16).

RAF-DB itself is not redistributable, so the benchmarks build its "basic" layout from the FER2013
shards the project already has:

    ROOT/EmoLabel/list_patition_label.txt    lines `train_00001.jpg 4`
    ROOT/Image/aligned/train_00001_aligned.jpg

Each face is resized 48 -> 100 px (bilinear) and tinted with a per-image random colour (a gain per
channel in [0.5, 1.0]), so the images are truly RGB (the three channels differ), then saved as a JPEG
(quality 90, what such exports use). A fifth of the images are `test_*`, the rest `train_*` (pack
carves val from train, as for RAF-DB). Labels are RAF-DB's numbers for FER2013's classes.

`repeat=k` lists every image k times under new names (the same bytes in k files): the memory benchmark
packs 2x and 4x the images this way without encoding anything again.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.classes import FER2013_CLASSES, RAFDB_CLASSES

# FER2013's class names -> RAF-DB's label numbers (1-based, RAF-DB's order).
RAF_LABEL = {fer: RAFDB_CLASSES.index(raf) + 1 for fer, raf in zip(
    FER2013_CLASSES, ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"))}
RAFDB_IMAGES = 15_339  # RAF-DB basic: 12,271 train + 3,068 test aligned faces
TEST_SHARE = 0.2


def fer_faces(data: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `limit` gray faces (N, H, W) uint8 and their RAF-DB label numbers, from raw shards (train,
    then val when train has too few). Classes that are not FER2013's map by index (tiny test sets)."""
    from pipeline.shards import load_manifest, read_split

    manifest = load_manifest(data)
    images, labels = [], []
    for split in ("train", "val", "test"):
        if sum(len(x) for x in images) >= limit or manifest["splits"].get(split, {}).get("count", 0) == 0:
            continue
        part = read_split(data, split, manifest=manifest)
        if part.images is None:
            raise ValueError(f"{data}: the {split} split is encoded; give raw FER2013 shards (facesense pack "
                             f"--store raw)")
        gray = part.images if part.images.ndim == 3 else part.images.mean(axis=3).astype(np.uint8)
        numbers = np.array([RAF_LABEL.get(c, i % 7 + 1) for i, c in enumerate(part.classes)], np.uint8)
        images.append(gray)
        labels.append(numbers[part.labels])
    gray, raf = np.concatenate(images)[:limit], np.concatenate(labels)[:limit]
    if len(gray) < limit:
        raise ValueError(f"{data}: {len(gray)} images, fewer than the {limit} asked for")
    return gray, raf


def colour_faces(gray: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8: each face resized (bilinear, one batched call) and tinted by its own
    random per-channel gain."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    gains = torch.from_numpy(rng.uniform(0.5, 1.0, (len(gray), 3, 1, 1)).astype(np.float32))
    out = np.empty((len(gray), size, size, 3), np.uint8)
    for lo in range(0, len(gray), 512):  # chunks: bounded float temporaries (512 x 224 x 224 x 3: 300 MB)
        x = torch.from_numpy(gray[lo:lo + 512]).unsqueeze(1).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * gains[lo:lo + 512]
        out[lo:lo + 512] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def encode_jpegs(images: np.ndarray, quality: int = 90, workers: int | None = None) -> list[bytes]:
    """Each image as JPEG bytes (Pillow; threads: its encoder releases the GIL)."""
    import io

    from PIL import Image

    def one(img: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(one, images, chunksize=256))


def write_raf_layout(root: Path, blobs: list[bytes], labels: np.ndarray, repeat: int = 1) -> int:
    """The RAF-DB basic layout under `root` (see the module docstring); returns the images listed."""
    aligned = root / "Image" / "aligned"
    aligned.mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    n_test = int(round(len(blobs) * TEST_SHARE))
    counters, lines = {"train": 0, "test": 0}, []
    for copy in range(repeat):
        for i, blob in enumerate(blobs):
            split = "test" if i < n_test else "train"
            counters[split] += 1
            name = f"{split}_{counters[split]:05d}"
            (aligned / f"{name}_aligned.jpg").write_bytes(blob)
            lines.append(f"{name}.jpg {int(labels[i])}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return len(lines)


def make_raf_set(data: Path, root: Path, images: int = RAFDB_IMAGES, size: int = 100, repeat: int = 1,
                 seed: int = 0) -> dict:
    """FER2013 shards -> a colour RAF-DB-layout source at `root`; what was made (for the result file)."""
    gray, labels = fer_faces(data, images)
    blobs = encode_jpegs(colour_faces(gray, size, seed))
    listed = write_raf_layout(root, blobs, labels, repeat)
    return {"source": str(data), "images": listed, "distinct_images": len(blobs), "repeat": repeat, "size": size,
            "jpeg_quality": 90, "jpeg_bytes_mean": float(np.mean([len(b) for b in blobs])),
            "colour": "per-image random gain per channel in [0.5, 1.0] on the gray face",
            "test_share": TEST_SHARE}
