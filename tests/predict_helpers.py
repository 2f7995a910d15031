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

FER = ROOT.parent / "shared" / "fer2013"
# The astronaut's face in skimage.data.astronaut() (512x512), located by eye: centre and side in pixels.
ASTRONAUT_FACE_CENTRE, ASTRONAUT_FACE_SIDE = (225, 115), 95


def make_checkpoint(path: Path, *, img_size: int = 48, channels: int = 1, ema: bool = False, seed: int = 0,
                    source: dict | None = None) -> Path:
    """A FaceSense checkpoint of the tiny timm EfficientNet with random (not zero) weights and
    non-trivial BatchNorm statistics, so different inputs give clearly different outputs.
    source: the faces it was "trained" on ({"image_shape": [H, W], "channels": C}); None: none recorded,
    as checkpoints before version 3 (48x48 gray)."""
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
               "history": [], "data": {}, **({"source": source} if source else {})}
    save_checkpoint(path, payload)
    return path


def torch_logits(checkpoint: Path, x: torch.Tensor, which: str = "auto") -> torch.Tensor:
    """The checkpoint's network in plain PyTorch (eval mode) on a prepared batch: its evaluation
    weights ("auto": the EMA when kept, as eval, predict and export use), or ckpt["model"/"ema"]."""
    from facesense.core.checkpoint import load_checkpoint, load_eval_model

    if which == "auto":
        model = load_eval_model(checkpoint).model
    else:
        ckpt = load_checkpoint(checkpoint)
        cfg = ckpt["config"]
        model = create_model(cfg["model"], cfg["channels"], len(ckpt["classes"]))
        model.load_state_dict(ckpt[which])
        model.eval()
    with torch.no_grad():
        return model(x)


def astronaut_bgr() -> np.ndarray:
    import cv2
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def write_astronaut(path: Path) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), astronaut_bgr())
    return path


def write_video(path: Path, frames: int = 9, fps: float = 10.0, fourcc: str = "mp4v") -> Path:
    """A video (MP4 by default; the container follows path's suffix) of the astronaut drifting right
    by 4 px a frame (a real face in every frame)."""
    import cv2

    image = astronaut_bgr()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (512, 512))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.roll(image, 4 * i, axis=1))
    writer.release()
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fer_val(n: int):
    """n real FER2013 val (PublicTest) faces from ../shared/fer2013, classes interleaved, decoded as
    `facesense pack` decodes them: (images, labels, files); None when the folder is absent."""
    from pipeline.folders import decode_images

    if not (FER / "test").is_dir():
        return None
    per_class = [sorted((FER / "test" / name).glob("PublicTest_*.jpg")) for name in FER2013_CLASSES]
    order = [(label, files[k]) for k in range(n) for label, files in enumerate(per_class) if k < len(files)][:n]
    if len(order) < n:
        return None
    files = [f for _, f in order]
    images, keep, _, _ = decode_images(FER, [f.relative_to(FER).as_posix() for f in files], workers=1,
                                       resize=False, skip_bad=False, show_progress=False)
    assert keep.all()
    return np.array(images), np.array([label for label, _ in order], np.int64), files
