"""`facesense export`: a checkpoint -> ONNX or TorchScript, ready for inference without FaceSense.

The exported network is the checkpoint's evaluation model (EMA weights when the run kept
them, eval mode: dropout off, BatchNorm on its running statistics), fp32, taking
(N, C, S, S) normalised faces with any batch size N and returning (N, K) logits. What
inference needs besides the graph (class names in order, input size, channels, the
normalisation, the 48 px face size) travels inside the file as one JSON string: the ONNX
metadata entry "facesense" (onnxruntime: `session.get_modelmeta().custom_metadata_map`),
or the TorchScript extra file "facesense.json" (`torch.jit.load(f, _extra_files=...)`).
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


def export(checkpoint: Path, fmt: str, out: Path) -> dict:
    """Write the export to `out` atomically; returns its metadata."""
    from facesense.core.checkpoint import eval_weights, load_checkpoint
    from facesense.infer.classifier import META_KEY, metadata
    from facesense.core.config import config_from_dict
    from facesense.core.model import create_model
    from pipeline.shards import sha256_file

    if fmt not in FORMATS:
        raise FaceSenseError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"], str(checkpoint))
    weights, which = eval_weights(ckpt)
    model = create_model(cfg.model, cfg.channels, len(ckpt["classes"]))
    model.load_state_dict(weights)
    model.eval()
    meta = metadata(ckpt, cfg, which, sha256_file(Path(checkpoint)))
    example = torch.zeros(2, cfg.channels, cfg.img_size, cfg.img_size)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with warnings.catch_warnings():  # the exporters' deprecation/progress chatter is not for the user
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _onnx(model, example, tmp, meta, META_KEY)
            else:
                traced = torch.jit.trace(model, example)
                torch.jit.save(traced, str(tmp), _extra_files={META_KEY + ".json": json.dumps(meta)})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict, key: str) -> None:
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
    entry.key, entry.value = key, json.dumps(meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
