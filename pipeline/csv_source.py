"""The challenge CSV (fer2013.csv / icml_face_data.csv) -> uint8 arrays.

Rows are split in Python (36k of them: cheap); the 83M pixel values are parsed in
one vectorised NumPy pass over the bytes of all pixel fields, which also finds every
bad value and the row it sits in. `line` numbers are 1-based lines of the file.

Accepted as they come: a UTF-8 byte-order mark (Excel's "CSV UTF-8"), CR-only line
ends, a gzipped CSV (fer2013.csv.gz) and Kaggle's original fer2013.tar.gz with the CSV
inside.
"""
from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classes import FACE_SIZE, FER2013_CLASSES, SPLITS, USAGE_TO_SPLIT
from pipeline.errors import BadItem, PackError, clip

PIXELS = FACE_SIZE * FACE_SIZE  # values in one row's pixels field
REQUIRED = ("emotion", "pixels", "usage")


@dataclass
class CsvRows:
    """Parsed rows, all of them kept in file order (bad ones flagged, not removed)."""

    images: np.ndarray  # (N, 48, 48) uint8; zeros where the row is bad
    labels: np.ndarray  # (N,) int64 emotion as written (validated against n_classes)
    splits: np.ndarray  # (N,) uint8 index into SPLITS
    lines: np.ndarray  # (N,) 1-based line number of each row
    bad: dict[int, str]  # row position -> reason


def read_csv(path: Path) -> CsvRows:
    """Parse the CSV; raise PackError for file-level problems, flag row-level ones.

    Rows are walked with bytes.find over the file held once in memory; the 9 KB pixel
    fields are kept as memoryview slices, never copied line by line.
    """
    data = read_text_bytes(path)
    first = data.find(b"\n")
    first = len(data) if first < 0 else first
    header = [h.strip().strip('"').lower() for h in data[:first].decode("utf-8", "replace").strip().split(",")]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        what = ("a binary file, not a CSV (gzip and tar.gz are read as they are)" if b"\0" in data[:first]
                else f"expected a header like 'emotion,pixels,Usage' (got {clip(','.join(header))!r})")
        raise PackError(f"{path}: line 1: missing column(s) {', '.join(missing)}; {what}")
    col = {name: header.index(name) for name in REQUIRED}
    n_cols = len(header)
    view = memoryview(data)

    labels, splits, line_nos, pixel_fields, bad = [], [], [], [], {}
    pos, line_no = first + 1, 2
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        stop = end - 1 if end > pos and data[end - 1] == ord("\r") else end
        start, pos, line_no = pos, end + 1, line_no + 1
        edges = [start - 1]  # field i spans edges[i] + 1 .. edges[i + 1]
        while (comma := data.find(b",", edges[-1] + 1, stop)) >= 0:
            edges.append(comma)
        edges.append(stop)
        if len(edges) == 2 and not data[start:stop].strip():
            continue  # blank lines (the trailing newline) carry no row
        row = len(labels)
        line_nos.append(line_no - 1)
        if len(edges) - 1 != n_cols:
            bad[row] = f"expected {n_cols} comma-separated fields, found {len(edges) - 1}"
            labels.append(0), splits.append(0), pixel_fields.append(b"")
            continue

        def field(i: int) -> bytes:  # a small field, copied
            return data[edges[i] + 1:edges[i + 1]].strip().strip(b'"')

        emotion, usage = field(col["emotion"]), field(col["usage"]).decode("utf-8", "replace")
        label = int(emotion) if emotion.isdigit() else -1
        if not 0 <= label < len(FER2013_CLASSES):
            bad[row] = (f"label {clip(emotion.decode('utf-8', 'replace'))!r} out of range "
                        f"0..{len(FER2013_CLASSES) - 1}")
        elif usage not in USAGE_TO_SPLIT:
            bad[row] = f"unknown Usage {clip(usage)!r}; expected one of {', '.join(USAGE_TO_SPLIT)}"
        labels.append(max(label, 0))
        splits.append(SPLITS.index(USAGE_TO_SPLIT.get(usage, "train")))
        a, b = edges[col["pixels"]] + 1, edges[col["pixels"] + 1]
        while a < b and data[a] in b' "':
            a += 1
        while b > a and data[b - 1] in b' "':
            b -= 1
        pixel_fields.append(view[a:b])
    if not labels:
        raise PackError(f"{path}: no data rows after the header")

    images, pixel_bad = parse_pixels(pixel_fields)
    for row, reason in pixel_bad.items():
        bad.setdefault(row, reason)
    return CsvRows(images.reshape(-1, FACE_SIZE, FACE_SIZE), np.array(labels, np.int64), np.array(splits, np.uint8),
                   np.array(line_nos, np.int64), bad)


def read_text_bytes(path: Path) -> bytes:
    """The CSV's bytes: unpacked from gzip or tar(.gz), without a BOM, with LF line ends."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if data[257:262] == b"ustar":  # a tar archive (Kaggle's fer2013.tar.gz): the CSV inside
            data = _csv_from_tar(path, data)
    except OSError as exc:
        if exc.errno is None:  # gzip's own errors (BadGzipFile) have no errno
            raise PackError(f"{path}: not a readable gzip file ({exc})") from exc
        raise PackError(f"{path}: cannot read ({exc.strerror})") from exc
    except (EOFError, zlib.error, tarfile.TarError) as exc:
        raise PackError(f"{path}: truncated or corrupt archive ({exc or type(exc).__name__})") from exc
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        data = data[3:]
    first = data.find(b"\n")
    cr = data.find(b"\r", 0, first if first >= 0 else len(data))
    if cr >= 0 and cr != first - 1:  # a bare CR ends the first line
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # CR-only line ends (classic Mac)
    return data


def _csv_from_tar(path: Path, data: bytes) -> bytes:
    """The one CSV in a tar archive (fer2013.csv preferred)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".csv")]
        if not members:
            raise PackError(f"{path}: a tar archive without a .csv file in it; pass fer2013.csv")
        member = next((m for m in members if m.name.rsplit("/", 1)[-1] == "fer2013.csv"), members[0])
        return tar.extractfile(member).read()


BLOCK_ROWS = 256  # ~2.5 MB of text per block: temporaries stay in cache and reuse their pages


def parse_pixels(fields) -> tuple[np.ndarray, dict[int, str]]:
    """Space-separated decimal pixel strings (bytes-like) -> ((N, 2304) uint8, {row: reason}).

    Works through blocks of rows: a pass over fresh whole-file temporaries (300 MB)
    costs more in page faults than in arithmetic (benchmarks/RESULTS.md, Pack).
    """
    images = np.zeros((len(fields), PIXELS), np.uint8)
    bad: dict[int, str] = {}
    for r0 in range(0, len(fields), BLOCK_ROWS):
        block = fields[r0:r0 + BLOCK_ROWS]
        images[r0:r0 + len(block)], block_bad = _parse_block(block)
        bad.update({r0 + row: reason for row, reason in block_bad.items()})
    return images, bad


def _parse_block(fields) -> tuple[np.ndarray, dict[int, str]]:
    """One block of rows; the same contract as parse_pixels.

    Passes on uint8/bool arrays: mark where each digit run ends, gather the last three
    digits of every run and combine them. Bad rows are located (per-row work) only
    when the totals disagree.
    """
    n = len(fields)
    # Three leading spaces: every run end e has three bytes before it, so e - k never wraps.
    blob = np.frombuffer(b"   " + b"\n".join(fields) + b"\n", np.uint8)
    d = blob - np.uint8(ord("0"))  # wraps: every non-digit byte becomes >= 10
    is_digit = d < 10
    is_end = is_digit.copy()
    is_end[:-1] &= ~is_digit[1:]

    ends = np.flatnonzero(is_end)  # one per pixel value: ~1/3.6 of the bytes

    def back(a: np.ndarray, k: int) -> np.ndarray:  # a[e - k] for every run end e
        return a[ends - k]

    f1, f2, f3 = back(is_digit, 1), back(is_digit, 2), back(is_digit, 3)
    values = d[ends].astype(np.uint16)
    values += f1 * (10 * back(d, 1).astype(np.uint16) + f2 * (100 * back(d, 2).astype(np.uint16)))
    row_ends = np.flatnonzero(blob == ord("\n"))
    bounds = np.concatenate([[0], row_ends])
    counts = np.array([np.count_nonzero(is_end[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])

    bad: dict[int, str] = {}
    n_space = np.count_nonzero(blob == ord(" "))
    if np.count_nonzero(is_digit) + n_space + len(row_ends) != len(blob):
        junk = np.flatnonzero(~is_digit & (blob != ord(" ")) & (blob != ord("\n")))
        rows, first = np.unique(np.searchsorted(row_ends, junk), return_index=True)
        for row, pos in zip(rows, junk[first]):
            bad[int(row)] = f"non-integer pixel value (unexpected character {chr(blob[pos])!r})"
    over = (values > 255) | (f1 & f2 & f3)  # > 255, or a run of 4+ digits
    if over.any():
        token_row = np.repeat(np.arange(n), counts)
        for row in np.unique(token_row[over]):
            bad.setdefault(int(row), "pixel value out of range 0..255")
    for row in np.flatnonzero(counts != PIXELS):
        bad.setdefault(int(row), f"expected {PIXELS} pixel values, found {counts[row]}")

    images = np.zeros((n, PIXELS), np.uint8)
    if not bad:
        images[:] = values.reshape(n, PIXELS)
    else:
        good = np.ones(n, bool)
        good[list(bad)] = False
        token_row = np.repeat(np.arange(n), counts)
        images[good] = values[good[token_row]].reshape(-1, PIXELS)
    return images, bad


def row_error(path: Path, line: int, reason: str) -> BadItem:
    return BadItem(f"{path.name} line {line}", reason)
