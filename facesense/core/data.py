"""The bridge to `pipeline.loaders`: TrainConfig -> LoaderConfig, clear errors, data identity."""
from __future__ import annotations

from pathlib import Path

import torch

from facesense.core.config import TrainConfig
from facesense.core.errors import FaceSenseError
from pipeline.errors import ShardError
from pipeline.shards import load_manifest


def open_split(data: str | Path, split: str, cfg: TrainConfig, device: torch.device, *, train: bool,
               batch_size: int, dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1,
               compile_cpu: bool = False):
    """A loader over `split` (train: shuffled + augmented, drop_last; eval: fixed order, all samples)."""
    from kernels.spec import AugConfig
    from pipeline.loaders import LoaderConfig, make_loader

    loader_cfg = LoaderConfig(kind=cfg.loader, batch_size=batch_size, img_size=cfg.img_size,
                              channels=cfg.channels, dtype=dtype, mean=(cfg.norm_mean,), std=(cfg.norm_std,),
                              aug=cfg.aug() if train else AugConfig.none(), train=train, drop_last=train,
                              seed=cfg.seed, rank=rank, world_size=world_size, workers=cfg.workers,
                              compile_cpu=compile_cpu)
    try:
        return make_loader(data, split, loader_cfg, device)
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
