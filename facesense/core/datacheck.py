"""Checks of the packed data when a run starts: the shards are the ones packed, the classes make sense.

A shard swapped for another pack's shard of the same size would train without a word,
and the checkpoint would record the manifest's hashes, not the data trained on. So each
shard this rank reads is hashed against the manifest first (cheap next to one epoch),
and the checkpoint's data identity is then the data itself.
"""
from __future__ import annotations

from pathlib import Path

from facesense.core.errors import FaceSenseError
from pipeline.shards import MANIFEST, rank_range, sha256_file


def shards_read(entry: dict, rank: int = 0, world_size: int = 1) -> list[dict]:
    """The manifest entries of the shards that hold this rank's contiguous part of a split."""
    start, stop = rank_range(entry["count"], rank, world_size)
    found, offset = [], 0
    for shard in entry["shards"]:
        if max(start, offset) < min(stop, offset + shard["count"]):
            found.append(shard)
        offset += shard["count"]
    return found


def check_shards(data: str | Path, manifest: dict, split: str, rank: int = 0, world_size: int = 1) -> None:
    """Hash every shard this rank reads of `split`; FaceSenseError naming the first that differs."""
    for shard in shards_read(manifest["splits"][split], rank, world_size):
        path = Path(data) / shard["file"]
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise FaceSenseError(f"{path}: cannot read ({exc.strerror}); run facesense verify {data}") from exc
        if digest != shard["sha256"]:
            raise FaceSenseError(f"{path}: not the shard {MANIFEST} lists (sha256 differs: replaced or changed "
                                 f"since packing); run facesense verify {data}")


def class_warnings(data: str | Path, manifest: dict) -> list[str]:
    """Warnings about classes missing from train or val; a train split of one class is an error."""
    classes = list(manifest["classes"])
    train = manifest["splits"]["train"].get("class_counts", {})
    val = manifest["splits"]["val"].get("class_counts", {})
    in_train = [c for c in classes if train.get(c, 0) > 0]
    if len(in_train) < 2:
        raise FaceSenseError(f"{data}: the train split holds images of one class only ({', '.join(in_train)}); "
                             f"a classifier needs at least two: check the source and pack it again")
    warnings = []
    no_train = [c for c in classes if train.get(c, 0) == 0]
    if no_train:
        warnings.append(f"the train split has no images of {', '.join(no_train)}: the model will never "
                        f"predict {'it' if len(no_train) == 1 else 'them'}")
    no_val = [c for c in in_train if val.get(c, 0) == 0]
    if no_val:
        warnings.append(f"the val split has no images of {', '.join(no_val)}: val accuracy, AUC and F1 leave "
                        f"{'it' if len(no_val) == 1 else 'them'} out and overstate the model "
                        f"(val holds {sum(1 for c in classes if val.get(c, 0))} of {len(classes)} classes)")
    return warnings
