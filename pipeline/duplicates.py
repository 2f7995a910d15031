"""Exact duplicates, cross-split leakage, conflicting labels and near-blank images.

FER2013 holds byte-identical faces within and across its splits (some labelled
differently) and a few blank frames. Pack reports them; `--dedupe` acts on them.
"""
from __future__ import annotations

import numpy as np

from pipeline.classes import SPLITS

# Near-blank: the whole image spans at most this many grey levels (max - min). FER2013's
# faces span ~200 levels; its blank frames 0. (A range on uint8 costs 1/20 of a std.)
NEAR_BLANK_RANGE = 10


def find_duplicates(images: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                    ids: list[str]) -> tuple[dict, np.ndarray]:
    """Report duplicate groups; also return the dedupe mask (True = keep).

    The mask drops train images that duplicate a val/test image, and near-blank
    train images; val and test stay the standard sets so results stay comparable.
    """
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    _, group_of, sizes = np.unique(flat.view(np.dtype((np.void, flat.shape[1]))).ravel(),
                                   return_inverse=True, return_counts=True)
    name = [f"{SPLITS[s]}:{i}" for s, i in zip(splits, ids)]
    groups, cross, conflicting = [], [], []
    dup_of_eval = np.zeros(len(images), bool)
    order = np.argsort(group_of, kind="stable")
    bounds = np.cumsum(sizes)[:-1]
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        k = len(groups)
        groups.append([name[m] for m in members])
        member_splits = set(splits[members].tolist())
        if len(member_splits) > 1:
            cross.append(k)
            if member_splits - {SPLITS.index("train")}:
                dup_of_eval[members] = splits[members] == SPLITS.index("train")
        if len(set(labels[members].tolist())) > 1:
            conflicting.append(k)
    near_blank = (flat.max(axis=1) - flat.min(axis=1)) <= NEAR_BLANK_RANGE
    report = {
        "groups": groups,
        "cross_split_groups": cross,
        "conflicting_label_groups": conflicting,
        "near_blank": [name[i] for i in np.flatnonzero(near_blank)],
        "near_blank_max_range": NEAR_BLANK_RANGE,
        "summary": {"groups": len(groups), "images_in_groups": int(sum(map(len, groups))),
                    "cross_split_groups": len(cross), "conflicting_label_groups": len(conflicting),
                    "near_blank": int(near_blank.sum())},
    }
    keep = ~(dup_of_eval | (near_blank & (splits == SPLITS.index("train"))))
    return report, keep
