"""`facesense export`: a checkpoint -> ONNX or TorchScript, ready for inference without FaceSense.

The exported network is the checkpoint's evaluation model (EMA weights when the run kept
them, eval mode: dropout off, BatchNorm on its running statistics), fp32, taking
(N, C, S, S) normalised faces with any batch size N and returning (N, K) logits. What
inference needs besides the graph (class names in order, input size, channels, the
normalisation, the 48 px face size) travels inside the file as one JSON string: the ONNX
metadata entry "facesense" (onnxruntime: `session.get_modelmeta().custom_metadata_map`),
or the TorchScript extra file "facesense.json" (`torch.jit.load(f, _extra_files=...)`).

This module owns that metadata both ways: `metadata` writes it, `read_metadata` checks it
when `predict` loads an .onnx (classifier.py), so the two cannot disagree on its format.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from facesense.core.errors import FaceSenseError
from pipeline.classes import FACE_SIZE

FORMATS = ("onnx", "torchscript")
OPSET = 18
META_KEY = "facesense"  # ONNX metadata_props key / TorchScript extra file (META_KEY + ".json") holding the JSON
META_FORMAT, META_VERSION = "facesense-export", 1


def metadata(ckpt: dict, cfg, which: str, sha256: str) -> dict:
    """What inference needs to know about an exported model (stored in the exported file)."""
    return {"format": META_FORMAT, "version": META_VERSION, "classes": list(ckpt["classes"]),
            "img_size": cfg.img_size, "channels": cfg.channels, "norm_mean": cfg.norm_mean,
            "norm_std": cfg.norm_std, "face_size": FACE_SIZE, "model": cfg.model, "weights": which,
            "checkpoint_sha256": sha256, "epoch": ckpt.get("epoch"), "step": ckpt.get("step")}


def read_metadata(raw: str | None, path: Path) -> dict:
    """The metadata JSON found in an exported file, checked; one-line FaceSenseError when missing or foreign."""
    if raw is None:
        raise FaceSenseError(f"{path}: no FaceSense metadata (class names, input size); "
                             f"export it with facesense export CKPT --format onnx")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise FaceSenseError(f"{path}: FaceSense metadata is not valid JSON ({exc})") from exc
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise FaceSenseError(f"{path}: metadata format {meta.get('format')!r} version {meta.get('version')!r}; "
                             f"this FaceSense reads {META_FORMAT} {META_VERSION}")
    return meta


def export(checkpoint: Path, fmt: str, out: Path) -> dict:
    """Write the export to `out` atomically (whole or not at all); returns its metadata."""
    from facesense.core.checkpoint import load_eval_model
    from facesense.core.files import atomic_path
    from pipeline.shards import sha256_file

    if fmt not in FORMATS:
        raise FaceSenseError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    net = load_eval_model(checkpoint)
    # Stored in the standard layout: channels-last is a runtime choice of PyTorch's, not the file's.
    model = net.model.to(memory_format=torch.contiguous_format)
    meta = metadata(net.ckpt, net.cfg, net.weights, sha256_file(Path(checkpoint)))
    example = torch.zeros(2, net.cfg.channels, net.cfg.img_size, net.cfg.img_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation/progress chatter is not for the user
        WRITERS[fmt](model, example, tmp, meta)
    return meta


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
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
    onnx.save(proto, str(path))


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(path), _extra_files={META_KEY + ".json": json.dumps(meta)})


WRITERS = {"onnx": _onnx, "torchscript": _torchscript}  # one per FORMATS entry
