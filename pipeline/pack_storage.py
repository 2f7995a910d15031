"""Which storage a pack gets (raw pixels or the files' own bytes), and why: `--store raw|encoded|auto`.

auto picks raw when every image has one size (or --size gives one) and the largest split's
decoded pixels stay within AUTO_RAW_MAX_BYTES: such a split is decoded once and kept in memory
by the loaders, so nothing is gained by decoding it every epoch (FER2013: 66 MB of train at
48x48 gray; RAF-DB aligned: 368 MB at 100x100 colour). Anything larger (AffectNet at 224 px
colour: ~43 GB of pixels against ~4 GB of JPEG) or of mixed sizes is stored encoded, and the
loaders decode it per batch. Every pack of a source gets one storage for all its splits.
"""
from __future__ import annotations

import numpy as np

from pipeline.classes import SPLITS

AUTO_RAW_MAX_BYTES = 1 << 30  # 1 GiB of decoded pixels in the largest split
STORES = ("auto", "raw", "encoded")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - the loop returns


def split_bytes(splits: np.ndarray, pixels_each: np.ndarray | int) -> dict[str, int]:
    """Decoded bytes per split; 255 (train, val slice undecided) counts as train."""
    codes = np.where(np.asarray(splits) == 255, SPLITS.index("train"), splits)
    per = np.broadcast_to(np.asarray(pixels_each, np.int64), codes.shape)
    return {s: int(per[codes == k].sum()) for k, s in enumerate(SPLITS)}


def choose(requested: str, splits: np.ndarray, channels: int, shape: tuple[int, int] | None,
           shapes: np.ndarray | None = None, resized: bool = False) -> tuple[str, str]:
    """(storage, why) for the manifest.

    `shape`: the one (H, W) raw images would have (--size, FER2013's 48x48, or the common
    size of `shapes`), None when the images differ in size and nothing resizes them.
    `shapes`: (N, 3) own (h, w, c) of each kept image, where known (for the note on mixed sizes).
    """
    if requested == "encoded":
        return "encoded", "--store encoded: each image's file bytes as in the source, decoded by the loaders"
    if requested == "raw":
        side = f"{shape[0]}x{shape[1]}x{channels}" if shape else "one size"
        return "raw", f"--store raw: uint8 pixels at {side}" + (" (resized, --size)" if resized else "")
    if shape is None:
        sizes = np.unique(shapes[:, :2], axis=0)[:2] if shapes is not None and len(shapes) else []
        seen = " and ".join(f"{w}x{h}" for h, w in sizes)
        return "encoded", (f"auto: images differ in size ({seen}, ...); raw storage would need --size N, "
                           f"encoded keeps each file as it is")
    per_split = split_bytes(splits, shape[0] * shape[1] * channels)
    largest = max(per_split, key=per_split.get)
    amount = f"the largest split ({largest}) is {human_bytes(per_split[largest])} decoded at " \
             f"{shape[0]}x{shape[1]}x{channels}"
    if per_split[largest] <= AUTO_RAW_MAX_BYTES:
        return "raw", f"auto: raw, {amount}, within the {AUTO_RAW_MAX_BYTES / 2 ** 30:g} GiB raw limit"
    return "encoded", (f"auto: encoded, {amount}, over the {AUTO_RAW_MAX_BYTES / 2 ** 30:g} GiB raw limit"
                       + ("; --size applies to raw storage only" if resized else ""))
