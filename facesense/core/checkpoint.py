"""Checkpoints: written atomically, read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values only (state dicts, the
config as a dict, RNG states as tensors), so loading one cannot run code:
`weights_only=True` refuses anything else.

    format, version     "facesense-checkpoint", 1
    model, ema          state dicts (ema None when off); eval uses ema when present
    optimizer, scheduler, scaler   their state dicts
    ranks               per rank: {rng: RNG states, epoch_loss_sum: its step losses so far this epoch}
    epoch, batch        position: `batch` batches of 0-based `epoch` are done (0 = at its start)
    step                optimizer steps taken in all
    best_accuracy, history   best val accuracy so far; per-epoch metrics rows
    config, classes, data    the resolved TrainConfig, class names, data identity

last.pt holds all of it (it is what --resume reads). best.pt is the selection
snapshot: the same minus optimizer, scheduler, scaler and per-rank states, which only
resuming needs; for EfficientNet-B0 that is 16 MB instead of 49 MB (AdamW's two moment
tensors per weight), small enough to ship in the repo.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from facesense.core.errors import FaceSenseError
from pipeline.errors import mount_point, no_space

FORMAT, VERSION = "facesense-checkpoint", 1


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: never half a file.

    Serialised in memory first: torch's zip writer turns a full disk into a RuntimeError
    without its errno, a plain write() keeps it. On failure the previous `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        why = (f"no space left on device {mount_point(path.parent)}" if no_space(exc)
               else f"cannot write it ({exc.strerror})")
        raise FaceSenseError(f"{path}: {why}; {kept}") from exc
    finally:
        tmp.unlink(missing_ok=True)


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


def load_checkpoint(path: Path | str) -> dict:
    """Read a checkpoint safely (no code can run) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FaceSenseError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # includes pickles that try to run code: weights_only refuses them
        raise FaceSenseError(f"{path}: not a loadable FaceSense checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FaceSenseError(f"{path}: not a FaceSense checkpoint (no format marker)")
    if ckpt.get("version") != VERSION:
        raise FaceSenseError(f"{path}: checkpoint version {ckpt.get('version')!r}; this FaceSense reads {VERSION}")
    return ckpt


def eval_weights(ckpt: dict) -> tuple[dict, str]:
    """The weights to evaluate: the EMA when the run kept one (it was selected on them)."""
    return (ckpt["ema"], "ema") if ckpt.get("ema") is not None else (ckpt["model"], "model")
