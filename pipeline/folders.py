"""FER2013's image folders (SRC/{train,test}/<class>/<Usage>_<id>.jpg) -> one (N, 48, 48) uint8 array, fast.

This is the raw 48x48 gray path of `facesense pack` (FER2013's own case); every other
combination of size, colour and storage goes through `pack_decode`. Scanning
(`imagefolders`) lists names only (os.scandir; no stat per file): the source fingerprint
(path, size, mtime of every file) comes from the decode workers' fstat of each file
they open, or from `stat_fingerprint` when an existing pack must be compared first.
Decoding runs in forked worker processes, a chunk of files per task, writing into
one shared array: 48x48 gray JPEGs through `jpeg_fast` (about half the time per
file), anything else through Image.open. torchvision's decoder (it needs torch
imported) and DALI's CPU decoder were measured and were no faster. The figures are
in benchmarks/RESULTS.md (Pack).
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import forkpool, jpeg_fast
from pipeline.classes import FACE_SIZE, FER2013_CLASSES
from pipeline.errors import BadItem, PackError
from pipeline.progress import progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Larger images are refused before decoding (decompression bombs); --resize takes anything up to this.
MAX_PIXELS = 4096 * 4096
CHUNK = 512  # files per worker task: large enough to hide task overhead, small enough for a smooth bar


@dataclass
class FolderScan:
    """What a scan found: one entry per image file, in a stable (sorted) order.

    Made by `imagefolders.scan_image_folders` (SRC/<split>/<class>/*) and `rafdb.scan_rafdb`.
    """

    paths: list[str]  # relative to the source root, '/'-separated (these become the ids)
    labels: np.ndarray  # uint8 class index into `classes`
    splits: np.ndarray  # uint8 index into SPLITS; 255 = train file whose val slice pack decides
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): entries never opened (FIFO, loop)
    classes: tuple[str, ...] = FER2013_CLASSES
    class_order: dict = field(default_factory=lambda: {"source": "fer2013", "detail": "FER2013's label order"})
    label_file: Path | None = None  # a file the labels came from (RAF-DB): part of the source's identity


def _fingerprint_lines(paths: list[str], sizes: np.ndarray, mtimes_ns: np.ndarray) -> bytes:
    return "".join(f"{p}\0{n}\0{t}\n" for p, n, t in zip(paths, sizes.tolist(), mtimes_ns.tolist())).encode()


def files_fingerprint(paths: list[str], sizes: np.ndarray, mtimes_ns: np.ndarray) -> str:
    """sha256 over (path, size, mtime) of every file: what tells an unchanged source."""
    return hashlib.sha256(_fingerprint_lines(paths, sizes, mtimes_ns)).hexdigest()


def stat_fingerprint(src: Path, paths: list[str]) -> str:
    """`files_fingerprint` from a stat of every file (before decoding, to compare with a pack)."""
    stats = []
    for rel in paths:
        try:
            stats.append(os.stat(os.path.join(src, rel)))
        except OSError as exc:
            raise PackError(f"{src / rel}: cannot read ({exc.strerror})") from exc
    return files_fingerprint(paths, np.array([st.st_size for st in stats], np.int64),
                             np.array([st.st_mtime_ns for st in stats], np.int64))


def stratified_val(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing round(fraction * n_c) items of every class c, seeded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(fraction * len(members)))
        mask[rng.permutation(members)[:take]] = True
    return mask


# The output array, shared with forked workers (an anonymous MAP_SHARED mapping made
# before the pool starts): workers write decoded images in place instead of pickling
# ~74 MB back through pipes.
_OUTPUT: np.ndarray | None = None


def _decode_with_pil(path: str, resize: bool) -> tuple[np.ndarray | None, str | None]:
    """Any image Pillow reads -> (48x48 uint8, None) or (None, why it is bad)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            # The size is in the header: check it before decoding anything (decompression bombs).
            width, height = img.size
            if width * height > MAX_PIXELS:
                return None, f"image is {width}x{height}, larger than {MAX_PIXELS:,} pixels (not a face crop)"
            if img.size != (FACE_SIZE, FACE_SIZE) and not resize:
                return None, (f"image is {width}x{height}, expected {FACE_SIZE}x{FACE_SIZE} "
                              f"(pass --resize to resize it, or --size N for another size)")
            img = _gray8(img)
            if img is None:
                return None, "32-bit integer or float image; save it as 8-bit gray or colour"
            if img.size != (FACE_SIZE, FACE_SIZE):
                img = img.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(img), None
    except Image.DecompressionBombError as exc:
        return None, f"image too large ({str(exc).splitlines()[0][:80]})"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        return None, f"unreadable or corrupt image ({str(exc).splitlines()[0][:80]})"


def _gray8(img):
    """8-bit gray, or None for modes with no agreed 8-bit scale (32-bit int, float).

    16-bit gray is scaled (65535 -> 255): Pillow's convert("L") clips it, which turns
    a 16-bit PNG almost all white. Other modes (colour, palette, 1-bit) convert as usual.
    """
    from PIL import Image

    if img.mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode in ("I", "F"):
        return None
    return img.convert("L") if img.mode != "L" else img  # colour -> gray


def _decode_chunk(task: tuple[str, int, list[str], bool]):
    """Worker: decode one chunk into _OUTPUT[start:].

    Returns ([(position, reason)] for bad files, sizes, mtimes_ns): the stat of each
    file as it was read feeds the source fingerprint (-1 where it could not be read).
    48x48 gray JPEGs (all of FER2013) take the fast path; anything else, and any file
    the fast path rejects, goes through Image.open.
    """
    root, start, rels, resize = task
    out = _OUTPUT[start:start + len(rels)]
    band = jpeg_fast.GrayBand(len(rels), FACE_SIZE) if jpeg_fast.AVAILABLE else None
    fast = np.zeros(len(rels), bool)
    sizes, mtimes, bad = [], [], []
    for i, rel in enumerate(rels):
        path = f"{root}/{rel}"
        try:
            data, st = jpeg_fast.read_file(path)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
        except jpeg_fast.NotRegularFile:  # replaced by a FIFO since the scan: never hand it to Image.open
            sizes.append(-1)
            mtimes.append(-1)
            bad.append((i, "not a regular file, not an image file"))
            continue
        except OSError:
            data = None  # unreadable: Image.open below reports it the usual way
            sizes.append(-1)
            mtimes.append(-1)
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            bad.append((i, f"not an image file (expected {'/'.join(IMAGE_SUFFIXES)})"))
            continue
        if band is not None and data is not None:
            fast[i] = band.decode(i, data)
        if not fast[i]:
            image, reason = _decode_with_pil(path, resize)
            if reason is None:
                out[i] = image
            else:
                bad.append((i, reason))
    if fast.any():
        out[fast] = band.array()[fast]
    return bad, np.array(sizes, np.int64), np.array(mtimes, np.int64)


def _shared_array(shape: tuple[int, ...]) -> np.ndarray:
    """uint8 array in an anonymous shared mapping: forked children write to the same pages."""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, count)), np.uint8, count).reshape(shape)


def decode_images(src: Path, paths: list[str], *, workers: int, resize: bool, skip_bad: bool,
                  show_progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict], str]:
    """Decode every file -> ((N, 48, 48) uint8, keep mask, skipped, source fingerprint).

    Bad files raise unless skip_bad; then they are False in the keep mask and listed
    as {"source", "error"}.
    """
    global _OUTPUT
    tasks = [(str(src), start, paths[start:start + CHUNK], resize)
             for start in range(0, len(paths), CHUNK)]
    keep = np.ones(len(paths), bool)
    fingerprint = hashlib.sha256()
    skipped = []
    images = _OUTPUT = _shared_array((len(paths), FACE_SIZE, FACE_SIZE))
    try:
        with progress_bar("decode", total=len(paths), enabled=show_progress) as advance, \
                forkpool.ordered_map(_decode_chunk, tasks, workers) as results:
            for (_, start, chunk, _), (bad, chunk_sizes, chunk_mtimes) in zip(tasks, results):
                # = files_fingerprint(paths, ...), built while the workers decode the next chunks
                fingerprint.update(_fingerprint_lines(chunk, chunk_sizes, chunk_mtimes))
                for i, reason in bad:
                    if not skip_bad:
                        raise BadItem(str(src / paths[start + i]), reason)
                    keep[start + i] = False
                    skipped.append({"source": paths[start + i], "error": reason})
                advance(len(chunk))
    finally:
        _OUTPUT = None  # the caller's array keeps the mapping alive as long as it needs it
    return images, keep, skipped, fingerprint.hexdigest()
