"""`facesense pack`: a face data set (FER2013 folders or CSV, FER+, RAF-DB, image folders) -> verified HDF5 shards.

Sources: FER2013's image folders or CSV (FER+ labels and votes with --ferplus), RAF-DB's
basic layout, and image-folder data sets SRC/<split>/<class>/* (pipeline/imagefolders.py,
pipeline/rafdb.py). Storage: raw uint8 pixels or each file's own bytes
(pipeline/pack_storage.py). FER2013's folders at 48x48 gray keep their own fast decode
(pipeline/folders.py); every other combination validates with pipeline/pack_decode.py.

The output appears atomically: everything is built in a hidden temporary directory
beside DIR and renamed into place only when complete (`staging.staged_dir`). An
interrupted pack removes its temporary directory; one killed outright (SIGKILL) leaves
it, and the next pack into the same DIR removes it. SIGTERM counts as an interrupt
where the program installed `interrupts.install_signal_policy` (the CLI does).
Rerunning on an unchanged source with the same options does nothing.

Pack deletes only what it can prove it wrote: a previous pack's manifest.json and the
shard files that manifest lists, and its own partial directories. An --out holding
anything else, or one that contains the source or lies inside it, is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline import csv_source, folders, forkpool, imagefolders, jpeg_fast, pack_decode, pack_storage, rafdb
from pipeline.classes import FACE_SIZE, FER2013_CLASSES, FERPLUS_CLASSES, SPLITS
from pipeline.duplicates import find_duplicates, find_file_duplicates
from pipeline.errors import BadItem, PackError, clip, require_dir
from pipeline.ferplus import DROP, read_ferplus_votes
from pipeline.shards import FORMAT_VERSION, MANIFEST, sha256_file, split_entry, write_shard
from pipeline.staging import staged_dir

FORMATS = ("auto", "folders", "imagefolder", "csv", "rafdb")  # imagefolder: another name for folders
MAX_SIZE = 4096  # --size at most (pixels per side)


@dataclass(frozen=True)
class PackOptions:
    format: str = "auto"  # auto | folders (= imagefolder) | csv | rafdb
    val_fraction: float = 0.1  # val share of train when the source has no val images
    seed: int = 0  # seeds the val slice and the shuffled order written to shards
    shard_size: int = 8192  # images per shard at most
    resize: bool = False  # accept images of other sizes and resize them to 48x48 (= size 48)
    skip_bad: bool = False  # skip bad images/rows (listed in the manifest) instead of failing
    dedupe: bool = False  # drop train images duplicating val/test, and near-blank train images
    ferplus: str | None = None  # fer2013new.csv path: relabel the CSV source with FER+ majority votes, keep votes
    store: str = "auto"  # auto | raw | encoded (pipeline/pack_storage.py)
    size: int | None = None  # raw: resize every image to size x size
    channels: int | None = None  # 1 (gray, ITU-R 601 luma) or 3 (RGB); None: the source's own
    classes: tuple[str, ...] | None = None  # image folders: class names in label order (--classes)
    raf_images: str | None = None  # RAF-DB: aligned (default) or original


FER2013_ORDER = {"source": "fer2013", "detail": "FER2013's label order (the CSV's emotion column)"}


@dataclass
class SourceImages:
    """A source's usable images with their labels, splits and ids: what the shards get.

    Raw: `images` holds the pixels. Encoded: `images` is None and each image's bytes are
    `blobs[i]` (the CSV's PNGs, or the files' bytes as validated) or, for sources too large to
    hold, the file `root / ids[i]`, checked against `digests[i]` when read again for its shard.
    """

    images: np.ndarray | None
    labels: np.ndarray
    splits: np.ndarray  # index into SPLITS
    ids: list[str]
    classes: tuple[str, ...]
    skipped: list[dict]
    notes: dict  # source-specific facts for the manifest
    source_id: str | None = None  # identity of the source contents, where loading yields it
    channels: int = 1
    storage_why: str = ""
    class_order: dict = field(default_factory=lambda: dict(FER2013_ORDER))
    votes: np.ndarray | None = None  # (N, 10) uint8 FER+ vote counts
    shapes: np.ndarray | None = None  # encoded: (N, 3) int32 own (h, w, c)
    digests: np.ndarray | None = None  # encoded: (N, 16) uint8 blake2b of each image's bytes
    ranges: np.ndarray | None = None  # encoded: (N,) max - min of each decoded image (near-blank)
    blobs: list | None = None  # encoded, made in memory: each image's bytes
    root: Path | None = None  # encoded from files: the directory ids are relative to

    @property
    def storage(self) -> str:
        return "raw" if self.images is not None else "encoded"

    def image_shape(self) -> list[int] | None:
        """The one (H, W) of every image (raw: the array's), None when encoded sizes differ."""
        if self.images is not None:
            return list(self.images.shape[1:3])
        sides = np.unique(self.shapes[:, :2], axis=0) if len(self.shapes) else []
        return [int(v) for v in sides[0]] if len(sides) == 1 else None

    def subset(self, keep: np.ndarray) -> "SourceImages":
        def take(a):
            return None if a is None else a[keep]

        index = np.flatnonzero(keep)
        return replace(self, images=take(self.images), labels=self.labels[keep], splits=self.splits[keep],
                       ids=[self.ids[i] for i in index], votes=take(self.votes), shapes=take(self.shapes),
                       digests=take(self.digests), ranges=take(self.ranges),
                       blobs=None if self.blobs is None else [self.blobs[i] for i in index])

    def blob(self, i: int) -> bytes:
        """Image i's bytes for an encoded shard: exactly the bytes pack validated."""
        if self.blobs is not None:
            return self.blobs[i]
        path = os.path.join(self.root, self.ids[i])
        try:
            data, _ = jpeg_fast.read_file(path)
        except OSError as exc:
            raise PackError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if pack_decode.digest(data) != self.digests[i].tobytes():
            raise PackError(f"{path}: changed while pack was running; pack again")
        return data


def detect_format(src: Path, requested: str) -> str:
    """The source format (folders, csv or rafdb), from SRC itself when requested is auto."""
    if requested not in FORMATS:
        raise PackError(f"--format {requested!r}: expected auto, folders (or imagefolder), csv or rafdb")
    if not src.exists():
        raise PackError(f"{src}: no such file or directory")
    fmt = {"imagefolder": "folders"}.get(requested, requested)
    if fmt == "auto":
        fmt = "csv" if not src.is_dir() else "rafdb" if rafdb.is_rafdb(src) else "folders"
    if fmt == "folders" and not src.is_dir():
        raise PackError(f"{src}: --format {requested} needs a directory with train/ (val/, test/) class folders")
    if fmt == "csv" and not src.is_file():
        raise PackError(f"{src}: --format csv needs the fer2013.csv file, not a directory")
    if fmt == "rafdb" and not rafdb.is_rafdb(src):
        raise PackError(f"{src}: --format rafdb needs {src / rafdb.LABEL_FILE} (RAF-DB's basic layout)")
    return fmt


def pack(src: Path | str, out: Path | str, opts: PackOptions = PackOptions(), *, workers: int | None = None,
         force: bool = False, show_progress: bool = True) -> tuple[dict, bool]:
    """Pack src into out. Returns (manifest, built): built is False when out was already up to date."""
    src, out = Path(src).resolve(), Path(out).resolve()
    fmt = _check_request(src, out, opts)
    owned = _owned_files(out) if out.exists() else set()  # refuses an --out holding foreign files
    scan = (imagefolders.scan_image_folders(src, opts.classes) if fmt == "folders"
            else rafdb.scan_rafdb(src, opts.raf_images or "aligned") if fmt == "rafdb" else None)
    if scan is not None and scan.bad and not opts.skip_bad:
        raise BadItem(str(src / scan.bad[0][0]), scan.bad[0][1])
    ferplus_sha = _sha256_or_fail(Path(opts.ferplus)) if opts.ferplus else None
    label_sha = _sha256_or_fail(scan.label_file) if scan is not None and scan.label_file else None

    source_id = None  # identity of the source contents; from the decode itself unless needed now
    if owned and not force:
        source_id = (_files_identity(folders.stat_fingerprint(src, scan.paths), label_sha) if scan is not None
                     else _sha256_or_fail(src))
        existing = out / MANIFEST
        if _read_fingerprint(existing) == _fingerprint(fmt, source_id, ferplus_sha, opts):
            return json.loads(existing.read_text()), False

    with staged_dir(out, owned) as tmp:
        workers = workers or os.cpu_count() or 1
        images = (_load_csv(src, opts) if scan is None
                  else _load_files(src, scan, fmt, opts, workers, show_progress))
        # Files: the decode's own stat of each file it read. CSV: its sha256.
        if scan is not None and images.source_id is not None:
            images.source_id = _files_identity(images.source_id, label_sha)
        source_id = images.source_id or source_id or _sha256_or_fail(src)
        fingerprint = _fingerprint(fmt, source_id, ferplus_sha, opts)
        manifest = _write(tmp, images, opts, fmt, src, fingerprint, workers)
    return manifest, True


def _files_identity(files_fingerprint: str, label_sha: str | None) -> str:
    """A file source's identity: its files' (path, size, mtime), and the label file where there is one."""
    if label_sha is None:
        return files_fingerprint
    return hashlib.sha256(f"{files_fingerprint}\0{label_sha}".encode()).hexdigest()


def _check_request(src: Path, out: Path, opts: PackOptions) -> str:
    """The source format; PackError for options out of range and for an --out pack must not use."""
    fmt = detect_format(src, opts.format)
    if opts.ferplus and fmt != "csv":
        raise PackError("--ferplus relabels the CSV source: pass fer2013.csv as SRC")
    if not 0.0 < opts.val_fraction < 1.0:
        raise PackError(f"--val-fraction {opts.val_fraction}: must be between 0 and 1")
    if opts.shard_size < 1:
        raise PackError(f"--shard-size {opts.shard_size}: must be at least 1")
    if opts.seed < 0:
        raise PackError(f"--seed {opts.seed}: must be zero or more")
    if opts.store not in pack_storage.STORES:
        raise PackError(f"--store {opts.store!r}: expected auto, raw or encoded")
    if opts.size is not None and not 1 <= opts.size <= MAX_SIZE:
        raise PackError(f"--size {opts.size}: must be between 1 and {MAX_SIZE} pixels")
    if opts.resize and opts.size not in (None, FACE_SIZE):
        raise PackError(f"--resize means --size {FACE_SIZE}; pass one of them, not --resize with --size {opts.size}")
    if (opts.size is not None or opts.resize) and opts.store == "encoded":
        raise PackError("--size/--resize resize raw pixels; --store encoded keeps every file as it is (the loaders "
                        "resize): drop --size or use --store raw")
    if opts.channels not in (None, 1, 3):
        raise PackError(f"--channels {opts.channels}: expected 1 (gray) or 3 (RGB)")
    if opts.classes is not None and fmt != "folders":
        raise PackError(f"--classes names the class folders of an image-folder source; a {fmt} source has its own "
                        f"classes")
    if opts.raf_images is not None and fmt != "rafdb":
        raise PackError("--raf-images chooses RAF-DB's image set; this source is not RAF-DB's layout")
    if opts.raf_images not in (None, *rafdb.IMAGE_SETS):
        raise PackError(f"--raf-images {opts.raf_images!r}: expected aligned or original")
    _check_out(src, out)
    return fmt


# A shard file name as write_shard makes it; nothing else in a manifest is trusted as ours.
_SHARD_NAME = re.compile(r"(train|val|test)-[0-9]+\.h5")


def _check_out(src: Path, out: Path) -> None:
    """Refuse an --out that is a file, or that would hold or sit inside the source."""
    if out == src or out in src.parents:
        raise PackError(f"--out {out} contains the source {src}; choose an --out outside the source")
    if src.is_dir() and src in out.parents:
        raise PackError(f"--out {out} is inside the source {src}; choose an --out outside the source")
    require_dir(out, "--out", PackError)


def _owned_files(out: Path) -> set[str]:
    """Names in an existing --out that an earlier pack wrote: its manifest.json and the shards it lists.

    Raises PackError when --out holds anything else (or is not a pack at all): those files
    are not ours to replace, with or without --force.
    """
    names = set(os.listdir(out))
    if not names:
        return set()
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        owned = {MANIFEST} | {shard["file"] for entry in manifest["splits"].values() for shard in entry["shards"]
                              if _SHARD_NAME.fullmatch(str(shard["file"]))}
        if not isinstance(manifest["format_version"], int) or not isinstance(manifest["classes"], list):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PackError(f"{out}: exists and is not a FaceSense shard directory (no FaceSense manifest.json); "
                        f"choose another --out") from None
    foreign = sorted(names - owned)
    if foreign:
        raise PackError(f"{out}: holds files pack did not write ({clip(', '.join(foreign))}); pack never "
                        f"deletes them, --force neither: move them away or choose another --out")
    return owned


def _sha256_or_fail(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:  # e.g. a --ferplus path that does not exist: one line, not a traceback
        raise PackError(f"{exc.filename}: cannot read ({exc.strerror})") from exc


def _fingerprint(fmt: str, source_id: str, ferplus_sha: str | None, opts: PackOptions) -> str:
    """Identity of (source contents, options): equal fingerprints mean an identical pack."""
    blob = json.dumps({"v": FORMAT_VERSION, "format": fmt, "source": source_id, "ferplus": ferplus_sha,
                       "options": {**asdict(opts), "ferplus": bool(opts.ferplus), "format": fmt}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_fingerprint(manifest_path: Path) -> str | None:
    try:
        return json.loads(manifest_path.read_text()).get("source", {}).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _val_slice(splits: np.ndarray, labels: np.ndarray, keep: np.ndarray, opts: PackOptions) -> dict:
    """Give undecided train items (255) their split, in place: a stratified seeded val slice of them when
    the source has no val images, else train. Returns the manifest note."""
    undecided = splits == imagefolders.TRAIN_UNDECIDED
    notes = {"val_from_train": False}
    if not (splits == SPLITS.index("val")).any() and undecided.any():
        # No val images (no PublicTest, no val/ folder): a stratified, seeded val slice of train.
        idx = np.flatnonzero(undecided & keep)
        val = folders.stratified_val(labels[idx], opts.val_fraction, opts.seed)
        splits[idx[val]] = SPLITS.index("val")
        notes["val_from_train"] = True
    splits[splits == imagefolders.TRAIN_UNDECIDED] = SPLITS.index("train")
    return notes


def _raw_size(opts: PackOptions) -> tuple[int, int] | None:
    """(H, W) that --size / --resize resize raw images to, or None."""
    side = opts.size or (FACE_SIZE if opts.resize else None)
    return (side, side) if side else None


def _load_files(src: Path, scan, fmt: str, opts: PackOptions, workers: int, show_progress: bool) -> SourceImages:
    """Image files (folders, RAF-DB): choose channels and storage, validate every file by decoding it."""
    fer2013 = fmt == "folders" and scan.class_order["source"] == "fer2013"
    channels = opts.channels or (1 if fer2013 else 3 if fmt == "rafdb" else None)  # None: from the images
    size = _raw_size(opts)
    shape = size or ((FACE_SIZE, FACE_SIZE) if fer2013 else None)  # what raw images must be (None: one size)
    n = len(scan.paths)
    if (fer2013 and channels == 1 and shape == (FACE_SIZE, FACE_SIZE) and opts.store != "encoded"
            and (opts.store == "raw" or max(pack_storage.split_bytes(scan.splits, FACE_SIZE ** 2).values())
                 <= pack_storage.AUTO_RAW_MAX_BYTES)):
        data = _load_folders(src, scan, opts, workers, show_progress)  # FER2013's own case: the fast path
        data.storage_why = pack_storage.choose(opts.store, data.splits, 1, shape, resized=size is not None)[1]
        return data

    skipped = [{"source": rel, "error": reason} for rel, reason in scan.bad]
    keep = np.ones(n, bool)

    def bad(position: int, reason: str) -> None:
        if not opts.skip_bad:
            raise BadItem(str(src / scan.paths[position]), reason)
        keep[position] = False
        skipped.append({"source": scan.paths[position], "error": reason})

    probe = None
    if opts.store != "encoded" and (channels is None or shape is None):
        # Raw size, channels or the auto choice depend on the images: read their headers first.
        probe = pack_decode.probe_files(src, scan.paths, workers=workers, show_progress=show_progress)
        for position, reason in probe.bad:
            bad(position, reason)
        own = probe.shapes[keep]
        channels = channels or (3 if (own[:, 2] == 3).any() else 1)
        if shape is None and len(own):
            first = int(np.flatnonzero(keep)[0])
            shape = tuple(int(v) for v in probe.shapes[first, :2])
            odd = np.flatnonzero(keep & np.any(probe.shapes[:, :2] != shape, axis=1))
            if opts.store == "raw":  # every odd one is a bad item: named (the first) or skipped
                for position in odd:
                    bad(int(position), pack_decode.size_mismatch(probe.shapes[position], shape, scan.paths[first]))
            elif len(odd):
                shape = None  # auto: mixed sizes are stored encoded
    storage, why = pack_storage.choose(opts.store, scan.splits[keep], channels or 1, shape,
                                       probe.shapes[keep] if probe is not None else None, resized=size is not None)
    raw = storage == "raw"
    plan = pack_decode.DecodePlan(raw=raw, channels=channels if raw else None, size=size if raw else None,
                                  shape=shape if raw else None)
    facts = pack_decode.decode_files(src, scan.paths, plan, only=np.flatnonzero(keep), workers=workers,
                                     show_progress=show_progress, on_bad=bad)
    stats = probe if probe is not None else facts
    source_id = folders.files_fingerprint(scan.paths, stats.sizes, stats.mtimes)
    if channels is None:  # encoded with the source's own colour: colour if any image is
        channels = 3 if (facts.shapes[keep, 2] == 3).any() else 1
    splits = scan.splits.copy()
    notes = _val_slice(splits, scan.labels, keep, opts)
    if fmt == "rafdb":
        notes["raf_images"] = opts.raf_images or "aligned"
    data = SourceImages(facts.images, scan.labels, splits, scan.paths, scan.classes, skipped, notes, source_id,
                        channels=channels, storage_why=why, class_order=dict(scan.class_order),
                        shapes=None if raw else facts.shapes, digests=None if raw else facts.digests,
                        ranges=None if raw else facts.ranges, blobs=facts.blobs, root=None if raw else src)
    return data if keep.all() else data.subset(keep)


def _load_folders(src: Path, scan, opts: PackOptions, workers: int, show_progress: bool) -> SourceImages:
    """FER2013's folders, raw 48x48 gray: the fast decode into one shared array."""
    images, keep, skipped, source_id = folders.decode_images(
        src, scan.paths, workers=workers, resize=opts.resize or opts.size == FACE_SIZE, skip_bad=opts.skip_bad,
        show_progress=show_progress)
    skipped = [{"source": rel, "error": reason} for rel, reason in scan.bad] + skipped
    splits = scan.splits.copy()
    notes = _val_slice(splits, scan.labels, keep, opts)
    data = SourceImages(images, scan.labels, splits, scan.paths, FER2013_CLASSES, skipped, notes, source_id,
                        class_order=dict(scan.class_order))
    return data if keep.all() else data.subset(keep)  # the usual case: no 74 MB copy


def _load_csv(src: Path, opts: PackOptions) -> SourceImages:
    rows = csv_source.read_csv(src)
    keep = np.ones(len(rows.labels), bool)
    skipped = []
    for pos in sorted(rows.bad):
        if not opts.skip_bad:
            raise csv_source.row_error(src, int(rows.lines[pos]), rows.bad[pos])
        keep[pos] = False
        skipped.append({"source": f"{src.name} line {rows.lines[pos]}", "error": rows.bad[pos]})
    labels, classes, notes, votes, order = rows.labels, FER2013_CLASSES, {}, None, dict(FER2013_ORDER)
    if opts.ferplus:
        usages = [{"train": "Training", "val": "PublicTest", "test": "PrivateTest"}[SPLITS[s]]
                  for s in rows.splits]
        labels, drops, votes = read_ferplus_votes(Path(opts.ferplus), len(labels), usages)
        keep &= labels != DROP
        classes, notes = FERPLUS_CLASSES, {"ferplus_dropped": drops}
        order = {"source": "ferplus", "detail": "FER+ majority vote of fer2013new.csv, FER+'s column order"}
    ids = [f"{src.name}:{line}" for line in rows.lines[keep]]
    channels = opts.channels or 1
    size = _raw_size(opts)
    shape = size or (FACE_SIZE, FACE_SIZE)
    storage, why = pack_storage.choose(opts.store, rows.splits[keep], channels, shape, resized=size is not None)
    images = rows.images if keep.all() else rows.images[keep]
    data = SourceImages(None, labels[keep], rows.splits[keep], ids, classes, skipped, notes, channels=channels,
                        storage_why=why, class_order=order, votes=None if votes is None else votes[keep])
    if storage == "raw":
        data.images = _csv_pixels(images, channels, shape)
    else:  # each row once as a lossless PNG: what an encoded split's loaders decode
        data.blobs = [_png(img) for img in images]
        data.shapes = np.tile(np.array([FACE_SIZE, FACE_SIZE, 1], np.int32), (len(images), 1))
        data.digests = np.frombuffer(b"".join(map(pack_decode.digest, data.blobs)), np.uint8).reshape(-1, 16)
        flat = images.reshape(len(images), -1)
        data.ranges = (flat.max(axis=1).astype(np.int16) - flat.min(axis=1)) if len(flat) else np.zeros(0, np.int16)
    return data


def _csv_pixels(images: np.ndarray, channels: int, shape: tuple[int, int]) -> np.ndarray:
    """The CSV's 48x48 gray rows at another size (Pillow bilinear, as decode does) and/or as RGB."""
    from PIL import Image

    from pipeline.decode import convert

    if tuple(shape) != (FACE_SIZE, FACE_SIZE):
        images = np.stack([convert(Image.fromarray(img), 1, shape) for img in images]) if len(images) \
            else np.zeros((0, *shape), np.uint8)
    if channels == 3:  # gray -> RGB is replication (what Pillow's convert("RGB") does)
        images = np.repeat(images[..., None], 3, axis=-1)
    return images


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", compress_level=1)  # lossless at any level; 1 is the fastest
    return buf.getvalue()


# (out_dir, data) for forked shard writers: they inherit it instead of unpickling 74 MB.
_SHARD_SOURCE: tuple[Path, SourceImages] | None = None


def _write_shard_job(job: tuple[str, int, np.ndarray]) -> dict:
    split, k, idx = job
    out_dir, data = _SHARD_SOURCE
    ids = [data.ids[i] for i in idx]
    votes = None if data.votes is None else data.votes[idx]
    if data.images is not None:
        return write_shard(out_dir, split, k, data.images[idx], data.labels[idx], ids, data.classes, votes=votes)
    return write_shard(out_dir, split, k, None, data.labels[idx], ids, data.classes, channels=data.channels,
                       encoded=[data.blob(i) for i in idx], shapes=data.shapes[idx], votes=votes)


def _write_shards(out_dir: Path, data: SourceImages, jobs: list, workers: int) -> list[dict]:
    """Write the planned shards, in parallel where there are workers (each is an HDF5 write and a sha256)."""
    global _SHARD_SOURCE
    _SHARD_SOURCE = (out_dir, data)
    try:
        with forkpool.ordered_map(_write_shard_job, jobs, workers) as entries:
            return list(entries)
    finally:
        _SHARD_SOURCE = None


def _write(tmp: Path, data: SourceImages, opts: PackOptions, fmt: str, src: Path, fingerprint: str,
           workers: int = 1) -> dict:
    if len(data.labels) == 0:
        raise PackError(f"{src}: no usable images (all were skipped or dropped)")
    if data.storage == "raw":
        report, keep = find_duplicates(data.images, data.labels, data.splits, data.ids)
    else:
        report, keep = find_file_duplicates(data.digests, data.ranges, data.labels, data.splits, data.ids)
    if opts.dedupe:
        report["removed"] = [f"{SPLITS[s]}:{i}" for s, i, k in zip(data.splits, data.ids, keep) if not k]
    else:
        keep[:] = True
    rng = np.random.default_rng(opts.seed)
    order, jobs = {}, []
    for code, split in enumerate(SPLITS):
        # Shuffled once here so that any contiguous slice (a DDP rank's part) is class-mixed.
        order[split] = idx = rng.permutation(np.flatnonzero((data.splits == code) & keep))
        jobs += [(split, k, idx[start:start + opts.shard_size])
                 for k, start in enumerate(range(0, len(idx), opts.shard_size))]
    shards = _write_shards(tmp, data, jobs, workers)
    shape = data.image_shape()
    splits = {split: split_entry(data.labels[idx], data.classes,
                                 [entry for (s, _, _), entry in zip(jobs, shards) if s == split],
                                 storage=data.storage, channels=data.channels, image_shape=shape)
              for split, idx in order.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": list(data.classes),
        "class_order": data.class_order,
        "storage": {"requested": opts.store, "why": data.storage_why},
        "votes": data.votes is not None,
        "splits": splits,
        "source": {"format": fmt, "path": str(src), "fingerprint": fingerprint, **data.notes},
        "options": {**asdict(opts)},
        "skipped": data.skipped,
        "duplicates": report,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
