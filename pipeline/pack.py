"""`facesense pack`: FER2013 (image folders or CSV, optionally FER+ labels) -> verified HDF5 shards.

The output appears atomically: everything is built in a hidden temporary directory
beside DIR and renamed into place only when complete (`staging.staged_dir`). An
interrupted pack removes its temporary directory; one killed outright (SIGKILL) leaves
it, and the next pack into the same DIR removes it. SIGTERM counts as an interrupt
where the program installed `interrupts.install_signal_policy` (the CLI does).
Rerunning on an unchanged source does nothing.

Pack deletes only what it can prove it wrote: a previous pack's manifest.json and the
shard files that manifest lists, and its own partial directories. An --out holding
anything else, or one that contains the source or lies inside it, is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import csv_source, folders, forkpool
from pipeline.classes import FER2013_CLASSES, FERPLUS_CLASSES, SPLITS
from pipeline.duplicates import find_duplicates
from pipeline.errors import BadItem, PackError, clip, require_dir
from pipeline.ferplus import DROP, read_ferplus
from pipeline.shards import FORMAT_VERSION, MANIFEST, sha256_file, split_entry, write_shard
from pipeline.staging import staged_dir


@dataclass(frozen=True)
class PackOptions:
    format: str = "auto"  # auto | folders | csv
    val_fraction: float = 0.1  # val share of unprefixed train images (only when no PublicTest exists)
    seed: int = 0  # seeds the val slice and the shuffled order written to shards
    shard_size: int = 8192  # images per shard at most
    resize: bool = False  # accept images of other sizes and resize them to 48x48
    skip_bad: bool = False  # skip bad images/rows (listed in the manifest) instead of failing
    dedupe: bool = False  # drop train images duplicating val/test, and near-blank train images
    ferplus: str | None = None  # fer2013new.csv path: relabel the CSV source with FER+ majority votes


@dataclass
class SourceImages:
    """A source's usable images, decoded, with their labels, splits and ids: what the shards get."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray  # index into SPLITS
    ids: list[str]
    classes: tuple[str, ...]
    skipped: list[dict]
    notes: dict  # source-specific facts for the manifest
    source_id: str | None = None  # identity of the source contents, where loading yields it


def detect_format(src: Path, requested: str) -> str:
    if requested not in ("auto", "folders", "csv"):
        raise PackError(f"--format {requested!r}: expected auto, folders or csv")
    if not src.exists():
        raise PackError(f"{src}: no such file or directory")
    fmt = requested if requested != "auto" else ("folders" if src.is_dir() else "csv")
    if fmt == "folders" and not src.is_dir():
        raise PackError(f"{src}: --format folders needs a directory with train/ and test/")
    if fmt == "csv" and not src.is_file():
        raise PackError(f"{src}: --format csv needs the fer2013.csv file, not a directory")
    return fmt


def pack(src: Path | str, out: Path | str, opts: PackOptions = PackOptions(), *, workers: int | None = None,
         force: bool = False, show_progress: bool = True) -> tuple[dict, bool]:
    """Pack src into out. Returns (manifest, built): built is False when out was already up to date."""
    src, out = Path(src).resolve(), Path(out).resolve()
    fmt = _check_request(src, out, opts)
    owned = _owned_files(out) if out.exists() else set()  # refuses an --out holding foreign files
    scan = folders.scan_folders(src) if fmt == "folders" else None
    if scan is not None and scan.bad and not opts.skip_bad:
        raise BadItem(str(src / scan.bad[0][0]), scan.bad[0][1])
    ferplus_sha = _sha256_or_fail(Path(opts.ferplus)) if opts.ferplus else None

    source_id = None  # identity of the source contents; from the decode itself unless needed now
    if owned and not force:
        source_id = folders.stat_fingerprint(src, scan.paths) if scan is not None else _sha256_or_fail(src)
        existing = out / MANIFEST
        if _read_fingerprint(existing) == _fingerprint(fmt, source_id, ferplus_sha, opts):
            return json.loads(existing.read_text()), False

    with staged_dir(out, owned) as tmp:
        workers = workers or os.cpu_count() or 1
        images = (_load_folders(src, scan, opts, workers, show_progress) if fmt == "folders"
                  else _load_csv(src, opts))
        # Folders: the decode's own stat of each file it read. CSV: its sha256.
        source_id = images.source_id or source_id or _sha256_or_fail(src)
        fingerprint = _fingerprint(fmt, source_id, ferplus_sha, opts)
        manifest = _write(tmp, images, opts, fmt, src, fingerprint, workers)
    return manifest, True


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


def _load_folders(src: Path, scan, opts: PackOptions, workers: int, show_progress: bool) -> SourceImages:
    images, keep, skipped, source_id = folders.decode_images(
        src, scan.paths, workers=workers, resize=opts.resize, skip_bad=opts.skip_bad,
        show_progress=show_progress)
    skipped = [{"source": rel, "error": reason} for rel, reason in scan.bad] + skipped
    splits = scan.splits.copy()
    unprefixed = splits == 255
    notes = {"val_from_train": False}
    if not (splits == SPLITS.index("val")).any() and unprefixed.any():
        # No PublicTest images: carve a stratified, seeded val slice from unprefixed train.
        idx = np.flatnonzero(unprefixed & keep)
        val = folders.stratified_val(scan.labels[idx], opts.val_fraction, opts.seed)
        splits[idx[val]] = SPLITS.index("val")
        notes["val_from_train"] = True
    splits[splits == 255] = SPLITS.index("train")
    if keep.all():  # the usual case: no 74 MB copy
        return SourceImages(images, scan.labels, splits, scan.paths, FER2013_CLASSES, skipped, notes, source_id)
    return SourceImages(images[keep], scan.labels[keep], splits[keep], [p for p, k in zip(scan.paths, keep) if k],
                  FER2013_CLASSES, skipped, notes, source_id)


def _load_csv(src: Path, opts: PackOptions) -> SourceImages:
    rows = csv_source.read_csv(src)
    keep = np.ones(len(rows.labels), bool)
    skipped = []
    for pos in sorted(rows.bad):
        if not opts.skip_bad:
            raise csv_source.row_error(src, int(rows.lines[pos]), rows.bad[pos])
        keep[pos] = False
        skipped.append({"source": f"{src.name} line {rows.lines[pos]}", "error": rows.bad[pos]})
    labels, classes, notes = rows.labels, FER2013_CLASSES, {}
    if opts.ferplus:
        usages = [{"train": "Training", "val": "PublicTest", "test": "PrivateTest"}[SPLITS[s]]
                  for s in rows.splits]
        labels, drops = read_ferplus(Path(opts.ferplus), len(labels), usages)
        keep &= labels != DROP
        classes, notes = FERPLUS_CLASSES, {"ferplus_dropped": drops}
    ids = [f"{src.name}:{line}" for line in rows.lines[keep]]
    return SourceImages(rows.images[keep], labels[keep], rows.splits[keep], ids, classes, skipped, notes)


# (out_dir, data) for forked shard writers: they inherit it instead of unpickling 74 MB.
_SHARD_SOURCE: tuple[Path, SourceImages] | None = None


def _write_shard_job(job: tuple[str, int, np.ndarray]) -> dict:
    split, k, idx = job
    out_dir, data = _SHARD_SOURCE
    return write_shard(out_dir, split, k, data.images[idx], data.labels[idx],
                       [data.ids[i] for i in idx], data.classes)


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
    if len(data.images) == 0:
        raise PackError(f"{src}: no usable images (all were skipped or dropped)")
    report, keep = find_duplicates(data.images, data.labels, data.splits, data.ids)
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
    splits = {split: split_entry(data.labels[idx], data.classes,
                                 [entry for (s, _, _), entry in zip(jobs, shards) if s == split])
              for split, idx in order.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": list(data.classes),
        "splits": splits,
        "source": {"format": fmt, "path": str(src), "fingerprint": fingerprint, **data.notes},
        "options": {**asdict(opts)},
        "skipped": data.skipped,
        "duplicates": report,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
