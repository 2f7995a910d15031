"""Image files of any size and colour -> what pack needs: a header probe, then one validating decode.

The general path of `facesense pack` (FER2013's raw 48x48 gray keeps its own fast path,
`folders.decode_images`). Both passes run in forked workers, a chunk of files per task:

* `probe_files` reads each file and its header only: (height, width, channels) and the
  stat that feeds the source fingerprint. Pack decides channels, raw size and storage
  from it before anything is decoded.
* `decode_files` decodes every file fully (the validation: a corrupt or truncated file is
  a bad item) with `pipeline.decode`, the rule the loaders use. Raw packs get the pixels
  written into one shared array at the target size and channels; every pack gets each
  file's own shape, the value range of its pixels (near-blank detection) and a blake2b
  digest of its bytes. Encoded packs get the validated bytes back too (up to KEEP_BYTES in
  all); beyond that the shard writers read each file again and check it against its
  digest. Either way the bytes stored are the bytes validated.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import decode, forkpool, jpeg_fast
from pipeline.folders import CHUNK, IMAGE_SUFFIXES, _shared_array
from pipeline.progress import progress_bar

DIGEST_BYTES = 16
# Encoded packs keep the validated bytes in memory up to this total (FER2013: 47 MB, RAF-DB aligned:
# ~90 MB); past it the shard writers read each file again and check it against its digest.
KEEP_BYTES = 1 << 30


@dataclass(frozen=True)
class DecodePlan:
    """What the validating decode makes of each file."""

    raw: bool  # write pixels into the shared output array
    channels: int | None = None  # raw: 1 or 3; None (encoded): validate in each file's own channels
    size: tuple[int, int] | None = None  # raw: (H, W) every image is resized to; None: must already be `shape`
    shape: tuple[int, int] | None = None  # raw without size: the (H, W) of every image


@dataclass
class FileFacts:
    """Per file, in path order: what the probe or the decode learnt. -1 / zeros where a file is bad."""

    shapes: np.ndarray  # (N, 3) int32: own (height, width, channels)
    sizes: np.ndarray  # (N,) int64 st_size as read
    mtimes: np.ndarray  # (N,) int64 st_mtime_ns as read
    bad: list[tuple[int, str]]  # (position, reason), in path order
    digests: np.ndarray | None = None  # (N, 16) uint8 blake2b of the bytes (decode only)
    ranges: np.ndarray | None = None  # (N,) int16 max - min of the decoded pixels (decode only)
    images: np.ndarray | None = None  # raw: (N, H, W) or (N, H, W, 3) uint8 (decode only)
    blobs: list | None = None  # encoded: each file's bytes as validated (None past KEEP_BYTES: read again)


def digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def _read(path: str):
    """(bytes, size, mtime_ns) or (None, -1, -1, reason)."""
    try:
        data, st = jpeg_fast.read_file(path)
    except jpeg_fast.NotRegularFile:  # replaced by a FIFO since the scan: never hand it to a decoder
        return None, -1, -1, "not a regular file, not an image file"
    except OSError as exc:
        return None, -1, -1, f"cannot read ({exc.strerror})"
    return data, st.st_size, st.st_mtime_ns, None


def header_shape(data: bytes) -> tuple[int, int, int]:
    """(height, width, channels) from the header alone; DecodeError for what is not an image."""
    frame = jpeg_fast.jpeg_frame(data)
    if frame is not None and frame[0] == 8 and frame[3] in (1, 3) and frame[1] and frame[2]:
        if frame[1] * frame[2] > decode.MAX_PIXELS:
            raise decode.DecodeError(f"image is {frame[2]}x{frame[1]}, larger than {decode.MAX_PIXELS:,} pixels")
        return frame[1], frame[2], frame[3]
    with decode.open_image(data) as img:  # other formats: Pillow reads the header only
        return img.size[1], img.size[0], decode.image_channels(img)


# Pillow raises DecompressionBombError (not an OSError) from Image.open for huge headers.
_BAD_IMAGE = (decode.DecodeError, Image.DecompressionBombError)


def _reason(exc: Exception) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large ({str(exc).splitlines()[0][:80]})"
    return str(exc)


def _suffix_error(rel: str) -> str | None:
    return None if rel.lower().endswith(IMAGE_SUFFIXES) else f"not an image file (expected {'/'.join(IMAGE_SUFFIXES)})"


def _probe_chunk(task):
    root, positions, rels = task
    n = len(rels)
    shapes, sizes, mtimes, bad = np.full((n, 3), -1, np.int32), np.full(n, -1, np.int64), np.full(n, -1, np.int64), []
    for i, rel in enumerate(rels):
        data, sizes[i], mtimes[i], reason = _read(f"{root}/{rel}")
        reason = reason or _suffix_error(rel)
        if reason is None:
            try:
                shapes[i] = header_shape(data)
            except _BAD_IMAGE as exc:
                reason = _reason(exc)
        if reason is not None:
            bad.append((int(positions[i]), reason))
    return positions, shapes, sizes, mtimes, bad


# The raw output array, shared with forked workers (see folders._OUTPUT).
_OUTPUT: np.ndarray | None = None


def _decode_chunk(task):
    root, positions, rels, plan = task
    n = len(rels)
    shapes, sizes, mtimes = np.full((n, 3), -1, np.int32), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    digests, ranges, bad = np.zeros((n, DIGEST_BYTES), np.uint8), np.zeros(n, np.int16), []
    band, fast = None, np.zeros(n, bool)  # small square gray JPEGs (FER2013's): jpeg_fast's band decoder
    blobs = None if plan.raw else [b""] * n  # encoded: the bytes go back to the parent (a memcpy, no decode)
    for i, rel in enumerate(rels):
        data, sizes[i], mtimes[i], reason = _read(f"{root}/{rel}")
        reason = reason or _suffix_error(rel)
        if reason is None:
            if blobs is not None:
                blobs[i] = data
            side = _band_side(data, plan, n)
            if side is not None and (band is None or band.side == side):
                band = band or jpeg_fast.GrayBand(n, side)
                fast[i] = band.decode(i, data)  # False: corrupt, or odd: Pillow decides and reports below
            if fast[i]:
                shapes[i] = (side, side, 1)
                digests[i] = np.frombuffer(digest(data), np.uint8)
                continue
            try:
                pixels, shapes[i] = decode_one(data, plan)
                ranges[i] = int(pixels.max()) - int(pixels.min()) if pixels.size else 0
                digests[i] = np.frombuffer(digest(data), np.uint8)
                if plan.raw:
                    _OUTPUT[positions[i]] = pixels
            except _BAD_IMAGE as exc:
                reason = _reason(exc)
        if reason is not None:
            bad.append((int(positions[i]), reason))
    if fast.any():
        rows = band.array()[fast]
        flat = rows.reshape(len(rows), -1)
        ranges[fast] = flat.max(axis=1).astype(np.int16) - flat.min(axis=1)
        if plan.raw:
            _OUTPUT[positions[fast]] = rows
    return positions, shapes, sizes, mtimes, bad, digests, ranges, blobs


BAND_MAX_BYTES = 1 << 26  # a chunk's band of gray pixels at most (FER2013: 512 x 48 x 48 = 1.2 MB)


def _band_side(data, plan: DecodePlan, n: int) -> int | None:
    """The side of a square 8-bit gray JPEG that the band decoder gives exactly what `plan` wants, else None.

    The band decodes as Image.open(...).convert("L") does, bit for bit (tests/test_jpeg_fast.py),
    without Image.open's per-file Python work: about half the time per small file.
    """
    if not jpeg_fast.AVAILABLE or plan.channels not in (None, 1):
        return None
    frame = jpeg_fast.jpeg_frame(data)
    if frame is None or frame[0] != 8 or frame[3] != 1 or frame[1] != frame[2] or not frame[1]:
        return None
    side = frame[1]
    if plan.raw and tuple(plan.size or plan.shape) != (side, side):
        return None  # a resize, or a size mismatch to report: the Pillow path
    return side if n * side * side <= BAND_MAX_BYTES else None


def decode_one(data, plan: DecodePlan) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One file's validating decode: (pixels as the plan wants them, its own (h, w, c)); DecodeError if bad."""
    with decode.open_image(data) as img:
        own = (img.size[1], img.size[0], decode.image_channels(img))
        if plan.raw and plan.size is None and own[:2] != tuple(plan.shape):
            raise decode.DecodeError(size_mismatch(own, plan.shape))
        channels = plan.channels or own[2]
        return decode.convert(img, channels, plan.size if plan.raw else None), own


def size_mismatch(own, shape, first: str | None = None) -> str:
    like = f" like {first}" if first else ""
    return (f"image is {own[1]}x{own[0]}, expected {shape[1]}x{shape[0]}{like} "
            f"(raw storage keeps one size: pass --size N to resize every image, or --store encoded)")


def _tasks(root, paths, positions, *extra):
    return [(str(root), positions[s:s + CHUNK], [paths[p] for p in positions[s:s + CHUNK]], *extra)
            for s in range(0, len(positions), CHUNK)]


def probe_files(root, paths: list[str], *, workers: int, show_progress: bool = True) -> FileFacts:
    """Header (h, w, c) and stat of every file; unreadable and non-image files in `bad`."""
    n = len(paths)
    facts = FileFacts(np.full((n, 3), -1, np.int32), np.full(n, -1, np.int64), np.full(n, -1, np.int64), [])
    with progress_bar("probe", total=n, enabled=show_progress) as advance, \
            forkpool.ordered_map(_probe_chunk, _tasks(root, paths, np.arange(n)), workers) as results:
        for positions, shapes, sizes, mtimes, bad in results:
            facts.shapes[positions], facts.sizes[positions], facts.mtimes[positions] = shapes, sizes, mtimes
            facts.bad += bad
            advance(len(positions))
    return facts


def decode_files(root, paths: list[str], plan: DecodePlan, *, only: np.ndarray | None = None, workers: int,
                 show_progress: bool = True, on_bad=None) -> FileFacts:
    """Decode every file (or the positions in `only`) as `plan` says.

    `on_bad(position, reason)` is called in path order as results come in (pack raises there
    unless --skip-bad, stopping the workers at the first bad file).
    """
    global _OUTPUT
    n = len(paths)
    positions = np.arange(n) if only is None else np.asarray(only, np.int64)
    facts = FileFacts(np.full((n, 3), -1, np.int32), np.full(n, -1, np.int64), np.full(n, -1, np.int64), [],
                      np.zeros((n, DIGEST_BYTES), np.uint8), np.zeros(n, np.int16))
    if plan.raw:
        side = plan.size or plan.shape
        facts.images = _OUTPUT = _shared_array((n, *side) + ((3,) if plan.channels == 3 else ()))
    kept, total = ({} if not plan.raw else None), 0
    try:
        with progress_bar("decode", total=len(positions), enabled=show_progress) as advance, \
                forkpool.ordered_map(_decode_chunk, _tasks(root, paths, positions, plan), workers) as results:
            for pos, shapes, sizes, mtimes, bad, digests, ranges, blobs in results:
                facts.shapes[pos], facts.sizes[pos], facts.mtimes[pos] = shapes, sizes, mtimes
                facts.digests[pos], facts.ranges[pos] = digests, ranges
                if kept is not None and blobs is not None:
                    kept.update(zip(pos.tolist(), blobs))
                    total += sizes[sizes > 0].sum()
                    if total > KEEP_BYTES:
                        kept = None  # too much to hold: the shard writers read the files again
                for item in bad:
                    if on_bad is not None:
                        on_bad(*item)  # may raise: the pool is stopped as the with-block exits
                    facts.bad.append(item)
                advance(len(pos))
    finally:
        _OUTPUT = None  # facts.images keeps the mapping alive as long as the caller needs it
    if kept is not None:
        facts.blobs = [kept.get(i, b"") for i in range(n)]
    return facts
