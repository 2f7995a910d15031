"""HDF5 shards and their manifest: the one data format everything downstream reads.

A shard `<split>-<k>.h5` holds `images` (uint8, N x 48 x 48), `labels` (uint8, N) and
`ids` (source file name or CSV line), chunked for whole-shard reads, with HDF5's
fletcher32 checksums, and attributes naming the format version, split and classes.
`manifest.json` beside them lists every shard with its count and sha256.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.classes import FACE_SIZE, SPLITS
from pipeline.errors import ShardError

FORMAT_VERSION = 1
MAGIC = "facesense-shards"
MANIFEST = "manifest.json"

CHUNK_IMAGES = 2048  # 4.7 MB chunks: whole-shard reads stay a few large reads


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(out_dir: Path, split: str, k: int, images: np.ndarray, labels: np.ndarray,
                ids: list[str], classes: tuple[str, ...]) -> dict:
    """Write `<split>-<k>.h5`; return its manifest entry {"file", "count", "sha256"}."""
    name, n = f"{split}-{k}.h5", len(images)
    with h5py.File(out_dir / name, "w") as f:
        f.create_dataset("images", data=images, chunks=(max(1, min(n, CHUNK_IMAGES)), FACE_SIZE, FACE_SIZE),
                         fletcher32=True)
        f.create_dataset("labels", data=labels.astype(np.uint8), fletcher32=True, chunks=(max(1, n),))
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        f.attrs.update(magic=MAGIC, format_version=FORMAT_VERSION, split=split, shard=k,
                       classes=json.dumps(list(classes)))
    return {"file": name, "count": n, "sha256": sha256_file(out_dir / name)}


def split_entry(labels: np.ndarray, classes: tuple[str, ...], shards: list[dict]) -> dict:
    """A split's manifest entry: count, per-class counts and its shards."""
    counts = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    return {"count": int(len(labels)),
            "class_counts": {c: int(n) for c, n in zip(classes, counts)},
            "shards": shards}


def load_manifest(data_dir: Path | str) -> dict:
    """Read and check manifest.json; refuse unknown format versions."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: not found; pack the data first: facesense pack SRC --out {data_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc}); re-run facesense pack --force") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {version!r} is not supported by this FaceSense "
                         f"(reads version {FORMAT_VERSION}); re-pack with this version's facesense pack")
    missing = [s for s in SPLITS if s not in manifest.get("splits", {})]
    if missing or "classes" not in manifest:
        raise ShardError(f"{path}: manifest lacks {', '.join(missing) or 'classes'}; re-pack the data")
    return manifest


@dataclass
class SplitArrays:
    """A split (or one rank's part of it) in memory."""

    images: np.ndarray  # (N, 48, 48) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    ids: list[str] | None = None  # filled when asked for (strings are slow to read)


def rank_range(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `count` items for one rank: disjoint, covering, sizes differ by <= 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return rank * count // world_size, (rank + 1) * count // world_size


def part_shards(entry: dict, rank: int = 0, world_size: int = 1):
    """(shard entry, its [lo, hi) rows, where they go in the part) for each shard that holds part of
    this rank's contiguous share of a split: the one walk that reading and checking a part both use."""
    start, stop = rank_range(entry["count"], rank, world_size)
    offset = 0  # global index of the current shard's first item
    for shard in entry["shards"]:
        lo, hi = max(start, offset), min(stop, offset + shard["count"])
        if lo < hi:
            yield shard, slice(lo - offset, hi - offset), slice(lo - start, hi - start)
        offset += shard["count"]


def read_split(data_dir: Path | str, split: str, rank: int = 0, world_size: int = 1,
               with_ids: bool = False, manifest: dict | None = None) -> SplitArrays:
    """A whole split as one array, or one DDP rank's contiguous part of it.

    Shards are written in a seeded shuffled order, so contiguous parts are class-mixed;
    a rank opens only the shards that overlap its part. `manifest`: the one already read.
    """
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    entry = manifest["splits"][split]
    start, stop = rank_range(entry["count"], rank, world_size)
    images = np.empty((stop - start, FACE_SIZE, FACE_SIZE), np.uint8)
    labels = np.empty(stop - start, np.int64)
    ids: list[str] = []
    for shard, rows, dest in part_shards(entry, rank, world_size):
        with _open_shard(data_dir / shard["file"], split) as f:
            images[dest] = f["images"][rows]
            labels[dest] = f["labels"][rows]
            if with_ids:
                ids += [s.decode() for s in f["ids"][rows]]
    return SplitArrays(images, labels, tuple(manifest["classes"]), ids if with_ids else None)


def _open_shard(path: Path, split: str) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ShardError(f"{path}: cannot open as HDF5 ({exc}); run facesense verify") from exc
    # Read the attributes before any close(): a closed file's attrs raise KeyError, not our message.
    magic, version, found_split = (f.attrs.get(k) for k in ("magic", "format_version", "split"))
    if magic != MAGIC or version != FORMAT_VERSION:
        f.close()
        raise ShardError(f"{path}: not a FaceSense shard of format_version {FORMAT_VERSION} "
                         f"(found {version!r}); re-pack the data")
    if found_split != split:
        f.close()
        raise ShardError(f"{path}: holds split {found_split!r}, manifest says {split!r}")
    return f


def verify(data_dir: Path | str) -> int:
    """Re-hash and check every shard against the manifest; return the image count.

    Raises ShardError naming the first bad shard.
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    n_classes = len(manifest["classes"])
    total = 0
    for split in SPLITS:
        entry = manifest["splits"][split]
        class_counts = np.zeros(n_classes, np.int64)
        for shard in entry["shards"]:
            path = data_dir / shard["file"]
            if not path.is_file():
                raise ShardError(f"{path}: missing (listed in {MANIFEST})")
            if sha256_file(path) != shard["sha256"]:
                raise ShardError(f"{path}: sha256 differs from {MANIFEST}: the file is corrupt or was changed")
            with _open_shard(path, split) as f:
                images, labels = f["images"], f["labels"]
                n = shard["count"]
                if images.dtype != np.uint8 or images.shape != (n, FACE_SIZE, FACE_SIZE):
                    raise ShardError(f"{path}: images are {images.dtype} {images.shape}, "
                                     f"expected uint8 ({n}, {FACE_SIZE}, {FACE_SIZE})")
                if labels.dtype != np.uint8 or labels.shape != (n,) or f["ids"].shape != (n,):
                    raise ShardError(f"{path}: labels/ids do not match the {n} images")
                try:
                    images[...]  # reading every chunk checks its fletcher32 checksum
                    values = labels[...]
                except OSError as exc:  # h5py reports a checksum mismatch as OSError
                    raise ShardError(f"{path}: corrupt data ({exc}); re-pack the data") from exc
                if n and values.max() >= n_classes:
                    raise ShardError(f"{path}: label {values.max()} out of range for {n_classes} classes")
                class_counts += np.bincount(values, minlength=n_classes)
            total += shard["count"]
        if class_counts.sum() != entry["count"] or \
                dict(zip(manifest["classes"], class_counts.tolist())) != entry["class_counts"]:
            raise ShardError(f"{data_dir / MANIFEST}: {split} counts do not match its shards")
    return total
