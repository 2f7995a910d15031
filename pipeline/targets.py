"""Training targets: the majority label, or FER+'s vote distribution (soft labels).

Soft targets follow Barsoum et al. 2016's "crossentropy" mode and FER+'s own outlier rule
(pipeline/ferplus.py): a column with 1 vote or less counts 0, then the K emotion columns
(the split's classes, matched by name; `unknown` and `NF` are left out) are normalised to
sum to 1. A row with no emotion vote left (pack drops those; a hand-made pack may not)
falls back to its majority label, one-hot.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.ferplus import VOTE_COLUMNS


def soft_targets(votes: np.ndarray | None, labels: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """(N, 10) vote counts -> (N, K) float32 distributions over the K = len(classes) classes."""
    if votes is None:
        raise ValueError("soft labels need FER+ vote counts, and these shards have none: pack with --ferplus "
                         "fer2013new.csv")
    unknown = [c for c in classes if c.lower() not in VOTE_COLUMNS]
    if unknown:
        raise ValueError(f"soft labels: class(es) {', '.join(unknown)} have no FER+ vote column "
                         f"({', '.join(VOTE_COLUMNS[:8])}); pack with --ferplus and FER+'s classes")
    columns = [VOTE_COLUMNS.index(c.lower()) for c in classes]
    kept = np.where(votes <= 1, 0, votes)[:, columns].astype(np.float32)
    total = kept.sum(axis=1, keepdims=True)
    onehot = np.eye(len(classes), dtype=np.float32)[np.asarray(labels, np.int64)]
    return np.where(total > 0, kept / np.maximum(total, 1), onehot).astype(np.float32)


def targets_tensor(part, soft: bool) -> torch.Tensor:
    """What a loader yields beside the images: (N,) int64 labels, or (N, K) float32 soft targets (CPU)."""
    if soft:
        return torch.from_numpy(soft_targets(part.votes, part.labels, part.classes))
    return torch.from_numpy(np.asarray(part.labels, np.int64))


__all__ = ["soft_targets", "targets_tensor"]
