"""The challenge CSV (fer2013.csv / icml_face_data.csv) -> uint8 arrays.

Rows are split in Python (36k of them: cheap); the 83M pixel values are parsed in
one vectorised NumPy pass over the bytes of all pixel fields, which also finds every
bad value and the row it sits in. `line` numbers are 1-based lines of the file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classes import FER2013_CLASSES, SPLITS, USAGE_TO_SPLIT
from pipeline.errors import BadItem, PackError

PIXELS = 48 * 48
REQUIRED = ("emotion", "pixels", "usage")


@dataclass
class CsvRows:
    """Parsed rows, all of them kept in file order (bad ones flagged, not removed)."""

    images: np.ndarray  # (N, 48, 48) uint8; zeros where the row is bad
    labels: np.ndarray  # (N,) int64 emotion as written (validated against n_classes)
    splits: np.ndarray  # (N,) uint8 index into SPLITS
    lines: np.ndarray  # (N,) 1-based line number of each row
    bad: dict[int, str]  # row position -> reason


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv(path: Path) -> CsvRows:
    """Parse the CSV; raise PackError for file-level problems, flag row-level ones."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackError(f"{path}: cannot read ({exc.strerror})") from exc
    lines = data.split(b"\n")
    header = [h.strip().strip('"').lower() for h in lines[0].decode("utf-8", "replace").strip().split(",")]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise PackError(f"{path}: line 1: missing column(s) {', '.join(missing)}; expected a header "
                        f"like 'emotion,pixels,Usage' (got {','.join(header)!r})")
    col = {name: header.index(name) for name in REQUIRED}
    n_cols = len(header)

    labels, splits, line_nos, pixel_fields, bad = [], [], [], [], {}
    for line_no, raw in enumerate(lines[1:], start=2):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue  # blank lines (the trailing newline) carry no row
        pos = len(labels)
        fields = [f.strip().strip(b'"') for f in raw.split(b",")]
        line_nos.append(line_no)
        if len(fields) != n_cols:
            bad[pos] = f"expected {n_cols} comma-separated fields, found {len(fields)}"
            labels.append(0), splits.append(0), pixel_fields.append(b"")
            continue
        emotion, usage = fields[col["emotion"]], fields[col["usage"]].decode("utf-8", "replace")
        label = int(emotion) if emotion.isdigit() else -1
        if not 0 <= label < len(FER2013_CLASSES):
            bad[pos] = (f"label {emotion.decode('utf-8', 'replace')!r} out of range "
                        f"0..{len(FER2013_CLASSES) - 1}")
        elif usage not in USAGE_TO_SPLIT:
            bad[pos] = f"unknown Usage {usage!r}; expected one of {', '.join(USAGE_TO_SPLIT)}"
        labels.append(max(label, 0))
        splits.append(SPLITS.index(USAGE_TO_SPLIT.get(usage, "train")))
        pixel_fields.append(fields[col["pixels"]])
    if not labels:
        raise PackError(f"{path}: no data rows after the header")

    images, pixel_bad = parse_pixels(pixel_fields)
    for pos, reason in pixel_bad.items():
        bad.setdefault(pos, reason)
    return CsvRows(images.reshape(-1, 48, 48), np.array(labels, np.int64), np.array(splits, np.uint8),
                   np.array(line_nos, np.int64), bad)


def parse_pixels(fields: list[bytes]) -> tuple[np.ndarray, dict[int, str]]:
    """Space-separated decimal pixel strings -> ((N, 2304) uint8, {row: reason}).

    The common case (every row valid) costs a handful of contiguous passes over the
    bytes; locating a bad row (searchsorted per token) runs only when one exists.
    """
    n = len(fields)
    blob = np.frombuffer(b"\n".join(fields) + b"\n", np.uint8)
    d = blob - np.uint8(ord("0"))  # wraps: every non-digit byte becomes >= 10
    is_digit = d < 10
    v = np.where(is_digit, d, np.uint8(0)).astype(np.uint16)
    # Value of the number ending at i (numbers have at most 3 digits; longer ones are flagged).
    val = v.copy()
    val[1:] += 10 * v[:-1]
    val[2:] += 100 * v[:-2] * is_digit[1:-1]
    is_end = is_digit.copy()
    is_end[:-1] &= ~is_digit[1:]
    values = val[is_end]
    too_long = np.zeros_like(is_digit)
    too_long[3:] = is_digit[3:] & is_digit[2:-1] & is_digit[1:-2] & is_digit[:-3]

    row_ends = np.flatnonzero(blob == ord("\n"))
    end_pos = np.flatnonzero(is_end)
    counts = np.diff(np.searchsorted(end_pos, row_ends), prepend=0)  # tokens per row
    junk = ~is_digit & (blob != ord(" ")) & (blob != ord("\n"))
    bad: dict[int, str] = {}
    if junk.any():
        at = np.flatnonzero(junk)
        rows, first = np.unique(np.searchsorted(row_ends, at), return_index=True)
        for row, pos in zip(rows, at[first]):
            bad[int(row)] = f"non-integer pixel value (unexpected character {chr(blob[pos])!r})"
    if too_long.any() or (values > 255).any():
        over = values > 255
        over[np.searchsorted(end_pos, np.flatnonzero(too_long))] = True  # token holding a 4th digit
        for row in np.unique(np.searchsorted(row_ends, end_pos[over])):
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
