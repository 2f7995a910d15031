"""The Kaggle image-folder layout: SRC/{train,test}/<class>/<Usage>_<id>.jpg -> uint8 arrays.

Scanning is one pass of os.scandir (its stat results feed the source fingerprint);
decoding runs in forked worker processes, a chunk of files per task, with PIL
(measured here: ~70 us per 48x48 JPEG; torchvision's decoder is ~10 us faster per
file but its 3.4 s import would cost more than it saves).
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classes import FER2013_CLASSES, SPLITS, USAGE_TO_SPLIT, folder_class_index
from pipeline.errors import BadItem, PackError
from pipeline.progress import progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIDE = 48
CHUNK = 512  # files per worker task: large enough to hide task overhead, small enough for a smooth bar


@dataclass
class FolderScan:
    """What a scan found: one entry per image file, in a stable (sorted) order."""

    paths: list[str]  # relative to the source root, '/'-separated (these become the ids)
    labels: np.ndarray  # uint8, FER2013 class index
    splits: np.ndarray  # uint8 index into SPLITS; 255 = unprefixed train file (val decided later)
    fingerprint: str  # sha256 over (path, size, mtime) of every file


def scan_folders(src: Path) -> FolderScan:
    """List image files and their label/split; raise PackError on layout problems."""
    tops = [name for name in ("train", "test") if (src / name).is_dir()]
    if not tops:
        raise PackError(f"{src}: not a FER2013 image-folder layout: expected {src}/train/<class>/ "
                        f"and/or {src}/test/<class>/ (or pass the CSV file)")
    paths, labels, splits = [], [], []
    digest = hashlib.sha256()
    for top in tops:
        for class_dir in sorted(os.scandir(src / top), key=lambda e: e.name):
            if class_dir.name.startswith("."):
                continue
            if not class_dir.is_dir():
                raise PackError(f"{class_dir.path}: unexpected file; {top}/ must hold one folder per class")
            label = folder_class_index(class_dir.name)
            if label is None:
                raise PackError(f"{class_dir.path}: unknown class folder {class_dir.name!r}; "
                                f"valid names (any case): {', '.join(FER2013_CLASSES)}")
            for entry in sorted(os.scandir(class_dir.path), key=lambda e: e.name):
                if entry.name.startswith(".") or entry.is_dir():
                    continue
                rel = f"{top}/{class_dir.name}/{entry.name}"
                stat = entry.stat()
                digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                paths.append(rel)
                labels.append(label)
                splits.append(_split_of(top, entry.name))
    if not paths:
        raise PackError(f"{src}: no images found under {' or '.join(t + '/' for t in tops)}")
    return FolderScan(paths, np.array(labels, np.uint8), np.array(splits, np.uint8), digest.hexdigest())


def _split_of(top: str, name: str) -> int:
    """FER2013 Usage from the file-name prefix; without one the folder decides."""
    usage = name.split("_", 1)[0]
    if usage in USAGE_TO_SPLIT:
        return SPLITS.index(USAGE_TO_SPLIT[usage])
    return 255 if top == "train" else SPLITS.index("test")


def stratified_val(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing round(fraction * n_c) items of every class c, seeded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(fraction * len(members)))
        mask[rng.permutation(members)[:take]] = True
    return mask


def _worker_init() -> None:
    # Workers are forked with SIGTERM/SIGINT blocked (see _start_pool) and the parent's
    # handler, which turns them into an exception for the parent's cleanup. The parent
    # owns interrupt handling: workers die quietly on SIGTERM and ignore Ctrl-C.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def _start_pool(workers: int):
    """A fork pool started with interrupts held back: a signal landing mid-fork would run
    the parent's handler in a half-made child, or be dropped inside an at-fork hook."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return mp.get_context("fork").Pool(workers, initializer=_worker_init)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending signal is delivered here


def _decode_chunk(task: tuple[str, list[str], bool]):
    """Worker: decode one chunk -> (uint8 images, [(position, reason)] for bad files)."""
    from PIL import Image, UnidentifiedImageError

    root, rels, resize = task
    out = np.empty((len(rels), SIDE, SIDE), np.uint8)
    bad = []
    for i, rel in enumerate(rels):
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            bad.append((i, f"not an image file (expected {'/'.join(IMAGE_SUFFIXES)})"))
            continue
        try:
            with Image.open(os.path.join(root, rel)) as img:
                img = img.convert("L") if img.mode != "L" else img  # colour -> gray
                if img.size != (SIDE, SIDE):
                    if not resize:
                        bad.append((i, f"image is {img.size[0]}x{img.size[1]}, expected {SIDE}x{SIDE} "
                                       f"(pass --resize to resize it)"))
                        continue
                    img = img.resize((SIDE, SIDE), Image.Resampling.BILINEAR, reducing_gap=None)
                out[i] = np.asarray(img)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            bad.append((i, f"unreadable or corrupt image ({str(exc).splitlines()[0][:80]})"))
    return out, bad


def decode_images(src: Path, paths: list[str], *, workers: int, resize: bool, skip_bad: bool,
                  show_progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode every file -> ((N, 48, 48) uint8, keep mask, skipped). Bad files raise unless skip_bad.

    With skip_bad, bad files are False in the keep mask and listed as {"source", "error"}.
    """
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    tasks = [(str(src), chunk, resize) for chunk in chunks]
    images = np.empty((len(paths), SIDE, SIDE), np.uint8)
    keep = np.ones(len(paths), bool)
    skipped = []
    pool = None
    with progress_bar("decode", total=len(paths), enabled=show_progress) as advance:
        try:
            if workers <= 1:
                results = map(_decode_chunk, tasks)
            else:
                # fork: workers start in milliseconds and inherit the imported modules.
                pool = _start_pool(workers)
                results = pool.imap(_decode_chunk, tasks)
            for k, (chunk_images, bad) in enumerate(results):
                start = k * CHUNK
                images[start:start + len(chunk_images)] = chunk_images
                for i, reason in bad:
                    if not skip_bad:
                        raise BadItem(str(src / paths[start + i]), reason)
                    keep[start + i] = False
                    skipped.append({"source": paths[start + i], "error": reason})
                advance(len(chunk_images))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return images, keep, skipped
