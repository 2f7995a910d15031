"""Checkpoints: written atomically, read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values only (state dicts, the
config as a dict, RNG states as tensors), so loading one cannot run code:
`weights_only=True` refuses anything else.

    format, version     "facesense-checkpoint", 3 (still read: 2 lacked `source`, 1 also epoch_correct_sum
                        and epoch_batches)
    model, ema          state dicts (ema None when off); eval uses ema when present
    optimizer, scheduler, scaler   their state dicts
    ranks               per rank: {rng: RNG states, epoch_loss_sum: its step losses so far this epoch,
                        epoch_correct_sum: its correct train predictions so far this epoch,
                        epoch_batches: how many batches those two sums hold}
    epoch, batch        position: `batch` batches of 0-based `epoch` are done (0 = at its start)
    step                optimizer steps taken in all
    best_accuracy, history   best val accuracy so far; per-epoch metrics rows
    config, classes, data    the resolved TrainConfig, class names, data identity
    source              what the model takes as a face: {"image_shape": [H, W], "channels": 1 | 3}, the train
                        split's (before the loader resizes to img_size and replicates gray to cfg.channels);
                        predict crops faces so. Absent before version 3: 48x48 gray (FER2013 was all there was)

last.pt holds all of it (it is what --resume reads). best.pt is the selection
snapshot: the same minus optimizer, scheduler, scaler and per-rank states, which only
resuming needs; for EfficientNet-B0 that is 16 MB instead of 49 MB (AdamW's two moment
tensors per weight), small enough to ship in the repo.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from facesense.core.errors import FaceSenseError
from facesense.core.files import write_bytes
from pipeline.classes import FACE_SIZE

if TYPE_CHECKING:
    from facesense.core.config import TrainConfig

FORMAT, VERSION = "facesense-checkpoint", 3
READS = (1, 2, 3)  # versions this FaceSense loads: 2 lacks `source`, 1 also ranks[i]["epoch_correct_sum", ...]
# What every checkpoint before `source` was trained on: FER2013's 48x48 gray faces.
LEGACY_SOURCE = {"image_shape": [FACE_SIZE, FACE_SIZE], "channels": 1}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: never half a file.

    Serialised in memory first: torch's zip writer turns a full disk into a RuntimeError
    without its errno, a plain write() keeps it. On failure the previous `path` is untouched.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    write_bytes(path, buffer.getbuffer())


RESUME_ONLY = ("optimizer", "scheduler", "scaler", "ranks")


def selection_snapshot(payload: dict) -> dict:
    """best.pt's content: everything but the state only resuming needs."""
    return {key: value for key, value in payload.items() if key not in RESUME_ONLY}


def shipping_snapshot(payload: dict, dtype: torch.dtype = torch.float16) -> dict:
    """A selection snapshot holding only the weights eval uses (the EMA when there is one), stored as
    `dtype`: what ships (model/, the GPU check). Loading casts them back into the float32 model;
    callers check that eval agrees with the full-precision checkpoint before shipping it."""
    weights, which = eval_weights(payload)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    snapshot = selection_snapshot(payload)
    snapshot.update(model=cast if which == "model" else None, ema=cast if which == "ema" else None)
    return snapshot


def torch_load(path: Path | str, what: str = "checkpoint"):
    """torch.load(weights_only=True) of a file, or one FaceSenseError line saying what the file is not.

    torch's own message for a refused file advises loading with weights_only=False, which would run
    any code the file holds: never passed on.
    """
    import zipfile

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise FaceSenseError(f"{path}: no such file") from exc
    except Exception as exc:  # any way a file can fail to load; classified below
        if path.is_file() and path.stat().st_size == 0:
            why = "an empty file (0 bytes)"
        elif not zipfile.is_zipfile(path):
            why = "not a file written by torch.save (that is a zip archive)"
        elif "weights_only" in str(exc) or "WeightsUnpickler" in str(exc):
            why = "it holds objects beyond tensors and plain values, which loading could run as code: refused"
        else:
            why = f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        raise FaceSenseError(f"{path}: not a loadable {what}: {why}") from exc


def load_checkpoint(path: Path | str) -> dict:
    """Read a checkpoint safely (no code can run) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FaceSenseError(f"{path}: no such checkpoint")
    ckpt = torch_load(path, "FaceSense checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FaceSenseError(f"{path}: not a FaceSense checkpoint (no format marker)")
    if ckpt.get("version") not in READS:
        raise FaceSenseError(f"{path}: checkpoint version {ckpt.get('version')!r}; this FaceSense reads versions "
                             f"{', '.join(map(str, READS))}")
    return ckpt


def checkpoint_source(ckpt: dict) -> dict:
    """{"image_shape": [H, W], "channels": C}: the faces the checkpoint's model was trained on."""
    source = ckpt.get("source") or LEGACY_SOURCE
    return {"image_shape": [int(v) for v in source["image_shape"]], "channels": int(source["channels"])}


def eval_weights(ckpt: dict) -> tuple[dict, str]:
    """The weights to evaluate: the EMA when the run kept one (it was selected on them)."""
    return (ckpt["ema"], "ema") if ckpt.get("ema") is not None else (ckpt["model"], "model")


@dataclass
class EvalModel:
    """A checkpoint's evaluation network, ready to run: what eval, predict and export all start from."""

    model: nn.Module  # eval mode, float32, channels-last, on `device`
    ckpt: dict  # the checkpoint as loaded (classes, epoch, step, data, ...)
    cfg: "TrainConfig"  # its training config
    weights: str  # "ema" or "model": which weights `model` holds
    source: dict  # {"image_shape": [H, W], "channels": C}: the faces it was trained on (checkpoint_source)


def load_eval_model(path: Path | str, device: torch.device | str = "cpu") -> EvalModel:
    """The one way to build an evaluation model: the checkpoint's EMA weights when it kept them."""
    from facesense.core.config import config_from_dict
    from facesense.core.model import create_model

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"], str(path))
    weights, which = eval_weights(ckpt)
    model = create_model(cfg.model, cfg.channels, len(ckpt["classes"]))
    model.load_state_dict(weights)
    model.to(device, memory_format=torch.channels_last).eval()
    return EvalModel(model, ckpt, cfg, which, checkpoint_source(ckpt))
