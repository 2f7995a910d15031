"""Helpers for the predict/export tests: a tiny checkpoint, a real portrait, a video made from it, FER faces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from facesense.core.checkpoint import save_checkpoint
from facesense.core.config import TrainConfig
from facesense.core.model import create_model
from pipeline.classes import FER2013_CLASSES
from train_helpers import MODEL, ROOT

SHARDS = ROOT / "data" / "shards"
FER = ROOT.parent / "shared" / "fer2013"
# The astronaut's face in skimage.data.astronaut() (512x512), located by eye: centre and side in pixels.
ASTRONAUT_FACE_CENTRE, ASTRONAUT_FACE_SIDE = (225, 115), 95


def make_checkpoint(path: Path, *, img_size: int = 48, channels: int = 1, ema: bool = False, seed: int = 0) -> Path:
    """A FaceSense checkpoint of the tiny timm EfficientNet with random (not zero) weights and
    non-trivial BatchNorm statistics, so different inputs give clearly different outputs."""
    torch.manual_seed(seed)
    cfg = TrainConfig(model=MODEL, img_size=img_size, channels=channels, ema=ema, norm_mean=0.45, norm_std=0.3)

    def weights() -> dict:
        model = create_model(MODEL, channels, len(FER2013_CLASSES))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        return model.state_dict()

    payload = {"model": weights(), "ema": weights() if ema else None, "config": cfg.to_dict(),
               "classes": list(FER2013_CLASSES), "epoch": 1, "batch": 0, "step": 10, "best_accuracy": 0.5,
               "history": [], "data": {}}
    save_checkpoint(path, payload)
    return path


def torch_logits(checkpoint: Path, x: torch.Tensor, which: str = "auto") -> torch.Tensor:
    """The checkpoint's network in plain PyTorch (eval mode) on a prepared batch."""
    from facesense.core.checkpoint import eval_weights, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    weights = eval_weights(ckpt)[0] if which == "auto" else ckpt[which]
    model = create_model(cfg["model"], cfg["channels"], len(ckpt["classes"]))
    model.load_state_dict(weights)
    with torch.no_grad():
        return model.eval()(x)


def astronaut_bgr() -> np.ndarray:
    import cv2
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def write_astronaut(path: Path) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), astronaut_bgr())
    return path


def write_video(path: Path, frames: int = 9, fps: float = 10.0) -> Path:
    """An MP4 of the astronaut drifting right by 4 px a frame (a real face in every frame)."""
    import cv2

    image = astronaut_bgr()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (512, 512))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.roll(image, 4 * i, axis=1))
    writer.release()
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fer_val(n: int):
    """n real FER2013 val (PublicTest) faces from the packed shards, with their source files; None if absent."""
    if not (SHARDS / "manifest.json").is_file() or not FER.is_dir():
        return None
    from pipeline.shards import read_split

    split = read_split(SHARDS, "val", with_ids=True)
    files = [FER / i for i in split.ids[:n]]
    if not all(f.is_file() for f in files):
        return None
    return split.images[:n], split.labels[:n], files
