"""HDF5 shards and their manifest: the one data format everything downstream reads.

A shard `<split>-<k>.h5` holds one split's images, `labels` (uint8, N) and `ids` (source
file name or CSV line), with attributes naming the format version, split, classes, storage
and channels. Images are stored one of two ways (format version 2):

* raw      `images` uint8 (N, H, W) gray or (N, H, W, 3) RGB, one size per split, chunked for
           whole-shard reads, with HDF5's fletcher32 checksums. FER2013 is 74 MB this way.
* encoded  `encoded`, a variable-length uint8 dataset holding each source file's bytes
           unchanged (CSV pixels: lossless PNG), and `shapes` int32 (N, 3): each file's own
           decoded (height, width, channels). For data whose pixels would not fit
           (AffectNet at 224 px colour: ~43 GB raw, ~4 GB as JPEG). `channels` says what
           every image decodes to (a colour JPEG in a gray pack is decoded to luma).

Optional `votes` uint8 (N, 10): FER+'s vote counts. `manifest.json` beside the shards lists
every shard with its count and sha256 (which covers every byte, encoded ones included).
Version-1 directories (raw 48x48 gray, no storage keys) are still read.
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

FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
MAGIC = "facesense-shards"
MANIFEST = "manifest.json"
STORAGES = ("raw", "encoded")

CHUNK_BYTES = 2048 * FACE_SIZE * FACE_SIZE  # 4.7 MB chunks (2048 FER2013 faces): whole-shard reads stay few
ENCODED_CHUNK = 1024  # encoded rows per chunk of the heap-pointer dataset


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(out_dir: Path, split: str, k: int, images: np.ndarray | None = None, labels: np.ndarray = None,
                ids: list[str] = None, classes: tuple[str, ...] = None, *, channels: int | None = None,
                encoded: list | None = None, shapes: np.ndarray | None = None,
                votes: np.ndarray | None = None) -> dict:
    """Write `<split>-<k>.h5` from raw `images` or `encoded` file bytes (+ their `shapes`).

    Returns its manifest entry: file, count, sha256, and what `split_entry` sums up (storage,
    channels, image_shape, decoded_bytes).
    """
    if (images is None) == (encoded is None):
        raise ValueError("write_shard: pass exactly one of images (raw) or encoded (file bytes)")
    name, n = f"{split}-{k}.h5", len(labels)
    storage = "raw" if images is not None else "encoded"
    if storage == "raw":
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise ValueError(f"raw images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
        channels = 1 if images.ndim == 3 else 3
        shape = list(images.shape[1:3])
        decoded = int(images.size)
    else:
        if channels not in (1, 3):
            raise ValueError(f"encoded shards need channels 1 or 3, got {channels!r}")
        shapes = np.asarray(shapes, np.int32).reshape(-1, 3)
        if len(encoded) != n or len(shapes) != n:
            raise ValueError(f"{n} labels but {len(encoded)} encoded images and {len(shapes)} shapes")
        sides = {(int(h), int(w)) for h, w in shapes[:, :2]}
        shape = list(sides.pop()) if len(sides) == 1 else None
        decoded = int((shapes[:, 0].astype(np.int64) * shapes[:, 1]).sum() * channels)
    with h5py.File(out_dir / name, "w") as f:
        if storage == "raw":
            per_image = max(1, int(np.prod(images.shape[1:])))
            chunk = max(1, min(n, CHUNK_BYTES // per_image))
            f.create_dataset("images", data=images, chunks=(chunk, *images.shape[1:]), fletcher32=True)
        else:
            column = np.empty(n, object)
            for i, blob in enumerate(encoded):  # one by one: equal lengths would make numpy build a 2-D array
                column[i] = blob if isinstance(blob, np.ndarray) else np.frombuffer(blob, np.uint8)
            f.create_dataset("encoded", data=column, dtype=h5py.vlen_dtype(np.uint8),
                             chunks=(max(1, min(n, ENCODED_CHUNK)),))
            f.create_dataset("shapes", data=shapes, fletcher32=True, chunks=(max(1, n), 3))
        f.create_dataset("labels", data=np.asarray(labels).astype(np.uint8), fletcher32=True, chunks=(max(1, n),))
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        if votes is not None:
            votes = np.asarray(votes)
            if votes.shape != (n, 10):
                raise ValueError(f"votes must be (N, 10), got {votes.shape}")
            f.create_dataset("votes", data=votes.astype(np.uint8), fletcher32=True, chunks=(max(1, n), 10))
        f.attrs.update(magic=MAGIC, format_version=FORMAT_VERSION, split=split, shard=k,
                       classes=json.dumps(list(classes)), storage=storage, channels=channels)
    return {"file": name, "count": n, "sha256": sha256_file(out_dir / name), "storage": storage,
            "channels": channels, "image_shape": shape, "decoded_bytes": decoded}


def split_entry(labels: np.ndarray, classes: tuple[str, ...], shards: list[dict], *,
                storage: str | None = None, channels: int | None = None,
                image_shape: list[int] | None = None) -> dict:
    """A split's manifest entry: count, per-class counts, its shards, and their storage summed up.

    `storage`/`channels`/`image_shape` are for a split with no shards (they cannot say); otherwise
    storage and channels must agree with the shards'.
    """
    counts = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    storages = {s.get("storage", "raw") for s in shards} | ({storage} if storage else set())
    channel_set = {s.get("channels", 1) for s in shards} | ({channels} if channels else set())
    if len(storages) > 1 or len(channel_set) > 1:
        raise ValueError(f"a split's shards must share storage and channels, got {storages} {channel_set}")
    sides = {tuple(s["image_shape"]) if s.get("image_shape") else None for s in shards if s["count"]}
    return {"count": int(len(labels)),
            "class_counts": {c: int(n) for c, n in zip(classes, counts)},
            "shards": shards,
            "storage": storages.pop() if storages else "raw",
            "channels": channel_set.pop() if channel_set else 1,
            "image_shape": (list(sides.pop()) if len(sides) == 1 and None not in sides
                            else list(image_shape) if not sides and image_shape else None),
            "decoded_bytes": int(sum(s.get("decoded_bytes", 0) for s in shards))}


def _fill_split_keys(entry: dict) -> None:
    """Version-1 splits (and hand-written manifests) carry no storage keys: they are raw 48x48 gray."""
    entry.setdefault("storage", "raw")
    entry.setdefault("channels", 1)
    entry.setdefault("image_shape", [FACE_SIZE, FACE_SIZE])
    entry.setdefault("decoded_bytes", entry.get("count", 0) * FACE_SIZE * FACE_SIZE)


def load_manifest(data_dir: Path | str) -> dict:
    """Read and check manifest.json; refuse unknown format versions. Version-1 keys are filled in."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: not found; pack the data first: facesense pack SRC --out {data_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc}); re-run facesense pack --force") from exc
    version = manifest.get("format_version")
    if version not in READS_VERSIONS:
        raise ShardError(f"{path}: format_version {version!r} is not supported by this FaceSense "
                         f"(reads versions {', '.join(map(str, READS_VERSIONS))}); re-pack with this version's "
                         f"facesense pack")
    missing = [s for s in SPLITS if s not in manifest.get("splits", {})]
    if missing or "classes" not in manifest:
        raise ShardError(f"{path}: manifest lacks {', '.join(missing) or 'classes'}; re-pack the data")
    for split in SPLITS:
        entry = manifest["splits"][split]
        _fill_split_keys(entry)
        if entry["storage"] not in STORAGES or entry["channels"] not in (1, 3):
            raise ShardError(f"{path}: {split} has storage {entry['storage']!r} and channels {entry['channels']!r}; "
                             f"this FaceSense reads raw or encoded with 1 or 3 channels: re-pack the data")
    manifest.setdefault("votes", False)
    manifest.setdefault("storage", {"requested": "raw", "why": "format version 1: raw only"})
    manifest.setdefault("class_order", {"source": "fer2013", "detail": "format version 1"})
    return manifest


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


class PartReader:
    """One rank's rows of a split, read from the shards on demand: memory grows with what is read.

    `dataset` is "encoded" (read() returns a list of 1-D uint8 arrays, the file bytes) or "images"
    (read() returns one stacked uint8 array). Files open on first use and stay open; a copy sent
    to another process (pickle) reopens its own.
    """

    def __init__(self, data_dir: Path | str, split: str, entry: dict, rank: int, world_size: int, dataset: str):
        self.data_dir, self.split, self.dataset = Path(data_dir), split, dataset
        self._walk = list(part_shards(entry, rank, world_size))
        # starts[j]: position in the part of shard j's first row; rows of shard j begin at its slice start
        self._starts = np.array([dest.start for _, _, dest in self._walk], np.int64)
        self._count = self._walk[-1][2].stop if self._walk else 0
        self._files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return self._count

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def _file(self, j: int) -> h5py.File:
        if j not in self._files:
            self._files[j] = _open_shard(self.data_dir / self._walk[j][0]["file"], self.split)
        return self._files[j]

    def read(self, index) -> list[np.ndarray] | np.ndarray:
        """Rows at part positions `index` (any order, repeats allowed), in that order."""
        index = np.asarray(index, np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= self._count):
            raise IndexError(f"part positions must lie in [0, {self._count})")
        shard_of = np.searchsorted(self._starts, index, side="right") - 1
        out: list = [None] * len(index)
        for j in np.unique(shard_of):
            where = np.flatnonzero(shard_of == j)
            _, rows, dest = self._walk[j]
            local = index[where] - dest.start + rows.start
            unique, inverse = np.unique(local, return_inverse=True)  # h5py wants increasing rows
            values = self._file(j)[self.dataset][unique]
            for pos, k in zip(where, inverse):
                out[pos] = values[k]
        return out if self.dataset == "encoded" else (np.stack(out) if out else np.empty((0,), np.uint8))

    def read_all(self) -> list[np.ndarray] | np.ndarray:
        """Every row of the part in order, shard by shard (whole reads, not row lookups)."""
        parts = [self._file(j)[self.dataset][rows] for j, (_, rows, _) in enumerate(self._walk)]
        if self.dataset == "encoded":
            return [row for part in parts for row in part]
        return np.concatenate(parts) if parts else np.empty((0,), np.uint8)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class EncodedPart(PartReader):
    """An encoded split's rows for one rank: the file bytes read on demand, their shapes in memory."""

    def __init__(self, data_dir: Path | str, split: str, entry: dict, rank: int, world_size: int,
                 shapes: np.ndarray):
        super().__init__(data_dir, split, entry, rank, world_size, "encoded")
        self.shapes = shapes  # (N, 3) int32: each file's own (height, width, channels)


@dataclass
class SplitArrays:
    """A split (or one rank's part of it): raw pixels in memory, or encoded bytes read on demand."""

    images: np.ndarray | None  # raw: (N, H, W) or (N, H, W, 3) uint8; None when encoded (or lazy)
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    ids: list[str] | None = None  # filled when asked for (strings are slow to read)
    encoded: EncodedPart | None = None  # encoded splits: this rank's file bytes, read on demand
    votes: np.ndarray | None = None  # (N, 10) uint8 when the pack kept FER+ votes
    channels: int = 1  # what the images are, or decode to
    image_shape: tuple[int, int] | None = (FACE_SIZE, FACE_SIZE)  # common (H, W); None: encoded sizes differ
    rows: PartReader | None = None  # raw splits read lazily (read_split(lazy=True)): rows on demand

    @property
    def storage(self) -> str:
        return "encoded" if self.encoded is not None else "raw"

    def __len__(self) -> int:
        return len(self.labels)


def read_split(data_dir: Path | str, split: str, rank: int = 0, world_size: int = 1,
               with_ids: bool = False, manifest: dict | None = None, lazy: bool = False) -> SplitArrays:
    """A whole split, or one DDP rank's contiguous part of it.

    Raw pixels are read into one array (lazy=True: left in the shards, `rows` reads them on demand);
    encoded bytes are never read here (`encoded` reads them on demand). Labels, votes and shapes are
    read in full. Shards are written in a seeded shuffled order, so contiguous parts are class-mixed;
    a rank opens only the shards that overlap its part. `manifest`: the one already read.
    """
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    entry = manifest["splits"][split]
    storage, channels = entry["storage"], entry["channels"]
    start, stop = rank_range(entry["count"], rank, world_size)
    n = stop - start
    shape = entry["image_shape"]
    raw = storage == "raw" and not lazy
    side = shape or (0, 0)  # an empty split may not know its size
    images = np.empty((n, *side) + ((3,) if channels == 3 else ()), np.uint8) if raw else None
    labels = np.empty(n, np.int64)
    shapes = np.empty((n, 3), np.int32) if storage == "encoded" else None
    votes = np.empty((n, 10), np.uint8) if manifest["votes"] else None
    ids: list[str] = []
    for shard, rows, dest in part_shards(entry, rank, world_size):
        with _open_shard(data_dir / shard["file"], split) as f:
            _check_layout(f, data_dir / shard["file"], storage, channels)
            if raw:
                images[dest] = f["images"][rows]
            if shapes is not None:
                shapes[dest] = f["shapes"][rows]
            if votes is not None:
                if "votes" not in f:
                    raise ShardError(f"{data_dir / shard['file']}: no votes, but {MANIFEST} says the pack kept "
                                     f"them; re-pack the data")
                votes[dest] = f["votes"][rows]
            labels[dest] = f["labels"][rows]
            if with_ids:
                ids += [s.decode() for s in f["ids"][rows]]
    encoded = EncodedPart(data_dir, split, entry, rank, world_size, shapes) if shapes is not None else None
    lazy_rows = PartReader(data_dir, split, entry, rank, world_size, "images") if storage == "raw" and lazy else None
    return SplitArrays(images, labels, tuple(manifest["classes"]), ids if with_ids else None, encoded, votes,
                       channels, tuple(shape) if shape else None, lazy_rows)


def _open_shard(path: Path, split: str) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ShardError(f"{path}: cannot open as HDF5 ({exc}); run facesense verify") from exc
    # Read the attributes before any close(): a closed file's attrs raise KeyError, not our message.
    magic, version, found_split = (f.attrs.get(k) for k in ("magic", "format_version", "split"))
    if magic != MAGIC or version not in READS_VERSIONS:
        f.close()
        raise ShardError(f"{path}: not a FaceSense shard of format_version "
                         f"{' or '.join(map(str, READS_VERSIONS))} (found {version!r}); re-pack the data")
    if found_split != split:
        f.close()
        raise ShardError(f"{path}: holds split {found_split!r}, manifest says {split!r}")
    return f


def _check_layout(f: h5py.File, path: Path, storage: str, channels: int) -> None:
    """The shard holds what the manifest says (version-1 shards have no storage attributes: raw gray)."""
    found = (f.attrs.get("storage", "raw"), int(f.attrs.get("channels", 1)))
    if found != (storage, channels):
        raise ShardError(f"{path}: holds {found[0]} images with {found[1]} channel(s), {MANIFEST} says {storage} "
                         f"with {channels}; re-pack the data")


def verify(data_dir: Path | str) -> int:
    """Re-hash and check every shard against the manifest; return the image count.

    Raises ShardError naming the first bad shard. Encoded bytes are covered by the sha256 and
    their shapes checked; nothing is decoded.
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
                _check_layout(f, path, entry["storage"], entry["channels"])
                values = _verify_shard(f, path, shard["count"], entry, manifest["votes"])
                if len(values) and values.max() >= n_classes:
                    raise ShardError(f"{path}: label {values.max()} out of range for {n_classes} classes")
                class_counts += np.bincount(values, minlength=n_classes)
            total += shard["count"]
        if class_counts.sum() != entry["count"] or \
                dict(zip(manifest["classes"], class_counts.tolist())) != entry["class_counts"]:
            raise ShardError(f"{data_dir / MANIFEST}: {split} counts do not match its shards")
    return total


def _verify_shard(f: h5py.File, path: Path, n: int, entry: dict, has_votes: bool) -> np.ndarray:
    """Shapes and dtypes of one shard's datasets, every checksum read; returns its labels."""
    labels = f["labels"]
    if labels.dtype != np.uint8 or labels.shape != (n,) or f["ids"].shape != (n,):
        raise ShardError(f"{path}: labels/ids do not match the {n} images")
    checked = [labels]
    if entry["storage"] == "raw":
        images = f["images"]
        want = (n, *entry["image_shape"]) + ((3,) if entry["channels"] == 3 else ())
        if images.dtype != np.uint8 or images.shape != want:
            raise ShardError(f"{path}: images are {images.dtype} {images.shape}, expected uint8 {want}")
        checked.append(images)
    else:
        shapes = f["shapes"]
        if f["encoded"].shape != (n,) or shapes.shape != (n, 3) or shapes.dtype != np.int32:
            raise ShardError(f"{path}: encoded/shapes do not match the {n} images")
        checked.append(shapes)
    if has_votes:
        if "votes" not in f or f["votes"].shape != (n, 10):
            raise ShardError(f"{path}: votes missing or not ({n}, 10)")
        checked.append(f["votes"])
    try:
        for dataset in checked:
            dataset[...]  # reading every chunk checks its fletcher32 checksum
    except OSError as exc:  # h5py reports a checksum mismatch as OSError
        raise ShardError(f"{path}: corrupt data ({exc}); re-pack the data") from exc
    if entry["storage"] == "encoded" and n:
        sizes = f["shapes"][...]
        if (sizes[:, :2] < 1).any() or not np.isin(sizes[:, 2], (1, 3)).all():
            raise ShardError(f"{path}: impossible image shapes recorded; re-pack the data")
    return labels[...]
