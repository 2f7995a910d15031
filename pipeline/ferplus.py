"""FER+ relabelling (fer2013new.csv): majority vote of 10 annotators -> FER+'s 8 classes.

The rule follows FER+'s own `_process_data` in majority mode: votes of 1 or less are
outliers and count as 0; the top column (of all 10, `unknown` and `NF` included)
wins only with more than half of the remaining votes; otherwise the row is unknown.
Rows that end unknown or NF, and rows with an empty image name, are dropped.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.classes import FERPLUS_CLASSES
from pipeline.errors import PackError

VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                "contempt", "unknown", "nf")
DROP = -1  # label for rows FER+ leaves out


def majority_labels(votes: np.ndarray) -> np.ndarray:
    """(N, 10) vote counts -> (N,) FER+ class index, or DROP (unknown / NF / no majority)."""
    votes = np.where(votes <= 1, 0, votes)
    top = votes.argmax(axis=1)
    top_votes = votes[np.arange(len(votes)), top]
    wins = top_votes > 0.5 * votes.sum(axis=1)
    return np.where(wins & (top < len(FERPLUS_CLASSES)), top, DROP)


def read_ferplus(path: Path, n_rows: int, usages: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """Labels for the n_rows rows of fer2013.csv, in order; DROP marks rows to leave out.

    Returns (labels, drop_counts) where drop_counts tells how many rows went and why.
    `usages`, if given, is fer2013.csv's Usage per row: a mismatch means the files do
    not belong together.
    """
    labels, drops, _ = read_ferplus_votes(path, n_rows, usages)
    return labels, drops


def read_ferplus_votes(path: Path, n_rows: int, usages: list[str] | None = None
                       ) -> tuple[np.ndarray, dict, np.ndarray]:
    """`read_ferplus` plus the vote counts as written: (labels, drop_counts, (n_rows, 10) uint8 votes).

    The votes are kept as the file has them (outliers included): the majority rule is one use
    of them, a soft-label target (normalised votes) another.
    """
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise PackError(f"{path}: cannot read ({exc.strerror})") from exc
    if not rows:
        raise PackError(f"{path}: empty file; expected a FER+ header 'Usage,Image name,neutral,...'")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("usage", "image name", *VOTE_COLUMNS) if c not in header]
    if missing:
        raise PackError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    if len(body) != n_rows:
        raise PackError(f"{path}: has {len(body)} rows but the FER2013 CSV has {n_rows}; "
                        f"FER+ needs one row per fer2013.csv row, in the same order")
    name_col, usage_col = header.index("image name"), header.index("usage")
    vote_cols = [header.index(c) for c in VOTE_COLUMNS]
    votes = np.zeros((n_rows, len(VOTE_COLUMNS)), np.int64)
    empty_name = np.zeros(n_rows, bool)
    for i, row in enumerate(body):
        line = i + 2
        if len(row) != len(header):
            raise PackError(f"{path}: line {line}: expected {len(header)} fields, found {len(row)}")
        if usages is not None and row[usage_col].strip() != usages[i]:
            raise PackError(f"{path}: line {line}: Usage {row[usage_col].strip()!r} differs from the "
                            f"FER2013 CSV's {usages[i]!r}; the files do not match")
        try:
            votes[i] = [int(row[c]) for c in vote_cols]
        except ValueError:
            raise PackError(f"{path}: line {line}: vote counts must be integers") from None
        if votes[i].min() < 0 or votes[i].max() > 255:
            raise PackError(f"{path}: line {line}: vote counts must lie in 0..255 (FER+ has 10 annotators)")
        empty_name[i] = not row[name_col].strip()
    labels = majority_labels(votes)
    drops = {"empty_image_name": int(empty_name.sum()),
             "unknown_or_nf": int(((labels == DROP) & ~empty_name).sum())}
    labels[empty_name] = DROP
    return labels, drops, votes.astype(np.uint8)
