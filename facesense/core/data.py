"""The packed data as a run sees it: the manifest (read once per run), checks, loaders, data identity.

The checks run when a run starts. A shard swapped for another pack's shard of the same
size would train without a word, and the checkpoint would record the manifest's hashes,
not the data trained on. So each shard this rank reads is hashed against the manifest
first (cheap next to one epoch), and the checkpoint's data identity is then the data itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

from facesense.core.config import TrainConfig, for_data
from facesense.core.errors import FaceSenseError
from pipeline.errors import ShardError
from pipeline.shards import MANIFEST, load_manifest, part_shards, sha256_file


def open_split(data: str | Path, split: str, cfg: TrainConfig, device: torch.device, *, train: bool,
               batch_size: int, dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1,
               compile_cpu: bool = False, manifest: dict | None = None):
    """A loader over `split` (train: shuffled + augmented, drop_last; eval: fixed order, all samples).

    Soft labels (FER+ votes) are for training only: val and eval score the majority label. Channels
    and input size default to the data's (cfg None = from the manifest)."""
    from kernels.spec import AugConfig
    from pipeline.loaders import LoaderConfig, make_loader

    manifest = manifest or read_manifest(data)
    if cfg.channels is None or cfg.img_size is None:  # the data's own (train split's), as training resolves them
        cfg = for_data(cfg, manifest)
    channels, img_size = cfg.channels, cfg.img_size
    budget_gb = cfg.resident_budget_gb  # 0 = auto
    loader_cfg = LoaderConfig(kind=cfg.loader, batch_size=batch_size, img_size=img_size,
                              channels=channels, dtype=dtype, mean=(cfg.norm_mean,), std=(cfg.norm_std,),
                              aug=cfg.aug() if train else AugConfig.none(), train=train, drop_last=train,
                              seed=cfg.seed, rank=rank, world_size=world_size, workers=cfg.workers,
                              compile_cpu=compile_cpu, soft_labels=train and cfg.soft_labels,
                              resident_budget=int(budget_gb * 1e9) if budget_gb > 0 else None)
    try:
        return make_loader(data, split, loader_cfg, device, manifest)
    except ValueError as exc:  # the loader's own checks (empty split, batch larger than the split, ...)
        raise FaceSenseError(f"{data} ({split}): {exc}") from exc


def read_manifest(data: str | Path) -> dict:
    if not Path(data).is_dir():
        raise FaceSenseError(f"--data {data}: no such directory; pack the data first: "
                             f"facesense pack SRC --out {data}")
    try:
        return load_manifest(data)
    except ShardError as exc:
        raise FaceSenseError(str(exc)) from exc


def data_identity(data: str | Path, manifest: dict, split: str) -> dict:
    """What was read: directory, split, counts, the pack fingerprint and each shard's sha256."""
    entry = manifest["splits"][split]
    return {"dir": str(Path(data).resolve()), "split": split, "count": entry["count"],
            "class_counts": entry["class_counts"],
            "fingerprint": manifest.get("source", {}).get("fingerprint"),
            "shards": [{"file": s["file"], "sha256": s["sha256"]} for s in entry["shards"]]}


def check_shards(data: str | Path, manifest: dict, split: str, rank: int = 0, world_size: int = 1) -> None:
    """Hash every shard this rank reads of `split`; FaceSenseError naming the first that differs."""
    for shard, _, _ in part_shards(manifest["splits"][split], rank, world_size):
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
