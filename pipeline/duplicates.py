"""Exact duplicates, cross-split leakage, conflicting labels and near-blank images.

FER2013 holds byte-identical faces within and across its splits (some labelled
differently) and a few blank frames. Pack reports them; `--dedupe` acts on them.
Raw packs compare decoded pixels; encoded packs compare file bytes (a hash of each
file, taken while pack validates it), which is cheap and holds no pixels.
"""
from __future__ import annotations

import numpy as np

from pipeline.classes import SPLITS

# Near-blank: the whole image spans at most this many grey levels (max - min). FER2013's
# faces span ~200 levels; its blank frames 0. (A range on uint8 costs 1/20 of a std.)
NEAR_BLANK_RANGE = 10


def _row_hashes(flat: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row: sum of its 8-byte words times fixed odd multipliers (mod 2**64)."""
    pad = -flat.shape[1] % 8
    if pad:
        flat = np.pad(flat, ((0, 0), (0, pad)))
    words = flat.view(np.uint64)
    multipliers = np.random.default_rng(0x5EED).integers(1, 2**63, words.shape[1], np.uint64) * 2 + 1
    return words @ multipliers  # integer matmul wraps mod 2**64, with no 74 MB temporary


def _exact_groups(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group ids of byte-identical rows (0..G-1 per row) and each group's size.

    Sorting 32k rows of 2304 bytes by their bytes is slow; rows are grouped by a 64-bit
    hash instead, and only rows whose hash repeats are compared byte for byte, so a hash
    collision can never merge different images.
    """
    _, hash_group, hash_sizes = np.unique(_row_hashes(flat), return_inverse=True, return_counts=True)
    group_of = hash_group.ravel().astype(np.int64)
    shared = np.flatnonzero(hash_sizes[group_of] > 1)
    if len(shared):
        rows = flat[shared]
        _, exact = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(), return_inverse=True)
        group_of[shared] = len(hash_sizes) + exact.ravel()  # fresh ids: hash groups re-split exactly
    _, group_of, sizes = np.unique(group_of, return_inverse=True, return_counts=True)
    return group_of.ravel(), sizes


def find_duplicates(images: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                    ids: list[str]) -> tuple[dict, np.ndarray]:
    """Report duplicate groups of raw pixels; also return the dedupe mask (True = keep).

    The mask drops train images that duplicate a val/test image, and near-blank
    train images; val and test stay the standard sets so results stay comparable.
    """
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    group_of, sizes = _exact_groups(flat)
    near_blank = (flat.max(axis=1) - flat.min(axis=1)) <= NEAR_BLANK_RANGE
    return _report(group_of, sizes, near_blank, labels, splits, ids, "pixels")


def find_file_duplicates(digests: np.ndarray, value_ranges: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                         ids: list[str]) -> tuple[dict, np.ndarray]:
    """The same report for encoded packs, from what pack's validating decode measured.

    digests: (N, 16) uint8, a hash of each file's bytes: groups are byte-identical files (the
    same face saved twice in different encodings is not found; comparing pixels would mean
    holding every decoded image). value_ranges: (N,) max - min of each decoded image.
    """
    keys = np.ascontiguousarray(digests, np.uint8)
    _, group_of, sizes = np.unique(keys.view(np.dtype((np.void, keys.shape[1]))).ravel(),
                                   return_inverse=True, return_counts=True)
    near_blank = np.asarray(value_ranges) <= NEAR_BLANK_RANGE
    return _report(group_of.ravel(), sizes, near_blank, labels, splits, ids, "file bytes (blake2b)")


def _report(group_of: np.ndarray, sizes: np.ndarray, near_blank: np.ndarray, labels: np.ndarray,
            splits: np.ndarray, ids: list[str], method: str) -> tuple[dict, np.ndarray]:
    """The manifest's duplicates report from group ids (0..G-1 per image) and near-blank flags."""

    def name(i: int) -> str:  # only reported images get a name (most images are unique)
        return f"{SPLITS[splits[i]]}:{ids[i]}"

    groups, cross, conflicting = [], [], []
    dup_of_eval = np.zeros(len(group_of), bool)
    order = np.argsort(group_of, kind="stable")  # members of each group together, by position
    starts = np.cumsum(sizes) - sizes
    repeated = np.flatnonzero(sizes > 1)
    # Report groups in order of their first image (order[starts[g]] is group g's first member).
    for g in repeated[np.argsort(order[starts[repeated]], kind="stable")]:
        members = order[starts[g]:starts[g] + sizes[g]]
        k = len(groups)
        groups.append([name(m) for m in members])
        member_splits = set(splits[members].tolist())
        if len(member_splits) > 1:
            cross.append(k)
            if member_splits - {SPLITS.index("train")}:
                dup_of_eval[members] = splits[members] == SPLITS.index("train")
        if len(set(labels[members].tolist())) > 1:
            conflicting.append(k)
    report = {
        "method": method,
        "groups": groups,
        "cross_split_groups": cross,
        "conflicting_label_groups": conflicting,
        "near_blank": [name(i) for i in np.flatnonzero(near_blank)],
        "near_blank_max_range": NEAR_BLANK_RANGE,
        "summary": {"groups": len(groups), "images_in_groups": int(sum(map(len, groups))),
                    "cross_split_groups": len(cross), "conflicting_label_groups": len(conflicting),
                    "near_blank": int(near_blank.sum())},
    }
    keep = ~(dup_of_eval | (near_blank & (splits == SPLITS.index("train"))))
    return report, keep
