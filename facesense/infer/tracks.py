"""Faces linked across a video's sampled frames into tracks, and each track's label smoothed.

`Tracker`: a frame's boxes are matched to the live tracks by IoU, greedily (the most overlapping
pair first, at least MIN_IOU); an unmatched box starts a new track, and a track unseen for more
than `max_missed` sampled frames ends (its id is never given again within the video). Boxes of
a face filmed at a few frames a second move little between samples, so IoU alone suffices; no
motion model.

`Smoother`: a track's label is taken from its probabilities averaged over its last `window`
sampled frames (window 1: the frame's own), which damps the per-frame flicker of a classifier
on a face whose expression has not changed. The raw per-frame probabilities are kept as they are.

`TrackLog`: what the summary says of each track: first and last time, dominant smoothed label.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

MIN_IOU = 0.3  # overlap of a box with its track's last box that still makes it the same face
MAX_MISSED = 5  # sampled frames a track may go unseen (a missed detection, a turned head) before it ends


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Tracker:
    """Track ids (1, 2, ...) for the boxes of one video's successive sampled frames."""

    def __init__(self, min_iou: float = MIN_IOU, max_missed: int = MAX_MISSED):
        self.min_iou, self.max_missed = min_iou, max_missed
        self.live: dict[int, list] = {}  # track id -> [last box, sampled frames since seen]
        self.next_id = 1

    def update(self, boxes: list) -> list[int]:
        """The track id of each box (same order); tracks not seen now age, and end past max_missed."""
        pairs = sorted(((iou(box, last), k, tid) for k, box in enumerate(boxes)
                        for tid, (last, _) in self.live.items()), reverse=True)
        ids: list[int | None] = [None] * len(boxes)
        taken = set()
        for overlap, k, tid in pairs:
            if overlap < self.min_iou:
                break
            if ids[k] is None and tid not in taken:
                ids[k] = tid
                taken.add(tid)
        for tid in list(self.live):
            if tid not in taken:
                self.live[tid][1] += 1
                if self.live[tid][1] > self.max_missed:
                    del self.live[tid]
        for k, box in enumerate(boxes):
            if ids[k] is None:
                ids[k], self.next_id = self.next_id, self.next_id + 1
            self.live[ids[k]] = [tuple(box), 0]
        return ids


class Smoother:
    """Per track, the mean of its last `window` probability vectors (window 1: no smoothing)."""

    def __init__(self, window: int = 1):
        self.window = window
        self.history: dict = {}  # track key -> deque of its last `window` probability vectors

    def __call__(self, track, probs: np.ndarray) -> np.ndarray:
        past = self.history.setdefault(track, deque(maxlen=self.window))
        past.append(np.asarray(probs, np.float64))
        return np.mean(past, axis=0)


@dataclass
class TrackLog:
    """One track as the summary tells it."""

    first: float
    last: float
    labels: Counter = field(default_factory=Counter)  # smoothed label -> sampled frames

    def see(self, when: float, label: str) -> None:
        self.first, self.last = min(self.first, when), max(self.last, when)
        self.labels[label] += 1

    def line(self, track: int, unit: str) -> str:
        label, n = self.labels.most_common(1)[0]
        span = f"{self.first:g}-{self.last:g} {unit}"
        return f"  track {track}: {span}, {label} ({n} of {sum(self.labels.values())} frames)"
