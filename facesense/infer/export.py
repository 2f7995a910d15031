"""`facesense export`: a checkpoint -> ONNX or TorchScript, ready for inference without FaceSense.

The exported network is the checkpoint's evaluation model (EMA weights when the run kept
them, eval mode: dropout off, BatchNorm on its running statistics), fp32, taking
(N, C, S, S) normalised faces with any batch size N and returning (N, K) logits. What
inference needs besides the graph (class names in order, input size, channels, the
normalisation, and the faces' source shape and channels: how to crop them) travels inside
the file as one JSON string: the ONNX
metadata entry "facesense" (onnxruntime: `session.get_modelmeta().custom_metadata_map`),
or the TorchScript extra file "facesense.json" (`torch.jit.load(f, _extra_files=...)`).

This module owns that metadata both ways: `metadata` writes it, `read_metadata` checks it
when `predict` loads an .onnx (classifier.py), so the two cannot disagree on its format.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from facesense.core.errors import FaceSenseError

FORMATS = ("onnx", "torchscript")
OPSET = 18
META_KEY = "facesense"  # ONNX metadata_props key / TorchScript extra file (META_KEY + ".json") holding the JSON
# Version 2: source_shape [H, W] and source_channels (1 | 3) instead of version 1's face_size (a side; gray).
META_FORMAT, META_VERSION = "facesense-export", 2
META_READS = (1, 2)


def metadata(ckpt: dict, cfg, which: str, sha256: str) -> dict:
    """What inference needs to know about an exported model (stored in the exported file)."""
    from facesense.core.checkpoint import checkpoint_source

    source = checkpoint_source(ckpt)
    return {"format": META_FORMAT, "version": META_VERSION, "classes": list(ckpt["classes"]),
            "img_size": cfg.img_size, "channels": cfg.channels, "norm_mean": cfg.norm_mean,
            "norm_std": cfg.norm_std, "source_shape": source["image_shape"], "source_channels": source["channels"],
            "model": cfg.model, "weights": which, "checkpoint_sha256": sha256, "epoch": ckpt.get("epoch"),
            "step": ckpt.get("step")}


def read_metadata(raw: str | None, path: Path) -> dict:
    """The metadata JSON found in an exported file, checked; one-line FaceSenseError when missing or foreign."""
    if raw is None:
        raise FaceSenseError(f"{path}: no FaceSense metadata (class names, input size); "
                             f"export it with facesense export CKPT --format onnx")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise FaceSenseError(f"{path}: FaceSense metadata is not valid JSON ({exc})") from exc
    if meta.get("format") != META_FORMAT or meta.get("version") not in META_READS:
        raise FaceSenseError(f"{path}: metadata format {meta.get('format')!r} version {meta.get('version')!r}; "
                             f"this FaceSense reads {META_FORMAT} {' and '.join(map(str, META_READS))}")
    if meta["version"] == 1:  # exported from gray square faces of side face_size (FER2013's 48)
        meta = {**meta, "source_shape": [meta["face_size"]] * 2, "source_channels": 1}
    return meta


def export(checkpoint: Path, fmt: str, out: Path, overwrite: bool = False) -> dict:
    """Write the export to `out` atomically (whole or not at all); returns its metadata.

    `out` is checked before the (slow) export: a directory, an unwritable place, or, unless
    `overwrite`, the checkpoint itself or any other FaceSense checkpoint is refused in one line.
    """
    from facesense.core.checkpoint import load_eval_model
    from facesense.core.files import write_bytes
    from pipeline.shards import sha256_file

    if fmt not in FORMATS:
        raise FaceSenseError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    checkpoint, out = Path(checkpoint), Path(out)
    net = load_eval_model(checkpoint)
    check_out(checkpoint, out, overwrite)
    # Stored in the standard layout: channels-last is a runtime choice of PyTorch's, not the file's.
    model = net.model.to(memory_format=torch.contiguous_format)
    meta = metadata(net.ckpt, net.cfg, net.weights, sha256_file(checkpoint))
    example = torch.zeros(2, net.cfg.channels, net.cfg.img_size, net.cfg.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation/progress chatter is not for the user
        data = WRITERS[fmt](model, example, meta)
    write_bytes(out, data)  # serialised in memory: any write error is the one line atomic_path gives
    return meta


def check_out(checkpoint: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that would lose something or cannot be written, before any work; make its folder."""
    from facesense.core.files import tmp_path_for, write_error

    if out.is_dir():
        raise FaceSenseError(f"--out {out}: is a directory; give the file to write, e.g. {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        if out.samefile(checkpoint):
            raise FaceSenseError(f"--out {out}: is the checkpoint being exported; writing there would replace it "
                                 f"(and end --resume from it): choose another --out, or --overwrite")
        if _is_checkpoint(out):
            raise FaceSenseError(f"--out {out}: holds a FaceSense checkpoint, which the export would replace: "
                                 f"choose another --out, or --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tmp_path_for(out)  # what atomic_path writes: a folder that takes it takes the export
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
        probe.unlink()
    except OSError as exc:
        raise write_error(out, exc) from exc


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` loads as a FaceSense checkpoint (anything else, an earlier export say, may be replaced)."""
    import zipfile

    from facesense.core.checkpoint import load_checkpoint

    if not zipfile.is_zipfile(path):  # torch.save writes a zip: a cheap no for everything else
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.load's note on a TorchScript zip
            load_checkpoint(path)
    except FaceSenseError:
        return False
    return True


def _onnx(model: torch.nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    import contextlib
    import io

    import onnx

    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), opset_version=OPSET,
                                    external_data=False)
    proto = program.model_proto
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _torchscript(model: torch.nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    import io

    traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={META_KEY + ".json": json.dumps(meta)})
    return buffer.getvalue()


WRITERS = {"onnx": _onnx, "torchscript": _torchscript}  # one per FORMATS entry: model -> the file's bytes
