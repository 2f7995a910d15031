"""A trained model ready for inference: a FaceSense checkpoint (PyTorch) or an exported .onnx.

Both give the same thing: the class names, how a face is cropped (the data's size and channels)
and becomes the model's input (`faces.Preprocess`, from the checkpoint or the ONNX file's
metadata), and `probs(crops)` -> class probabilities. The ONNX path runs on onnxruntime alone: no timm,
no model code (torch only prepares the input tensor, with `faces.model_input`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facesense.core.errors import FaceSenseError
from facesense.infer.export import META_KEY, read_metadata
from facesense.infer.faces import Preprocess, model_input

NOT_A_MODEL = "expected a FaceSense checkpoint (.pt) or an exported .onnx"


class Classifier:
    classes: list[str]
    pre: Preprocess

    def logits(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def probs(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W) gray or (N, H, W, 3) RGB uint8 faces (pre.crop_shape) -> (N, K) float64 probabilities
        (softmax of the logits)."""
        z = self.logits(model_input(crops, self.pre)).astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


class TorchClassifier(Classifier):
    """A checkpoint's evaluation network (`load_eval_model`: EMA weights when kept, eval mode)."""

    def __init__(self, path: Path, device: str = "auto"):
        from facesense.core.checkpoint import load_eval_model
        from facesense.core.runtime import setup

        self.device = setup(device, deterministic=False).device  # a bad --device is its own error, not --model's
        try:
            net = load_eval_model(path, self.device)
        except FaceSenseError as exc:
            raise FaceSenseError(f"--model {exc}; {NOT_A_MODEL}") from exc
        self.model = net.model
        self.classes = list(net.ckpt["classes"])
        self.pre = Preprocess(net.cfg.img_size, net.cfg.channels, net.cfg.norm_mean, net.cfg.norm_std,
                              tuple(net.source["image_shape"]), net.source["channels"])

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()


class OnnxClassifier(Classifier):
    """An .onnx export run by onnxruntime; classes and preprocessing from the metadata stored in it."""

    def __init__(self, path: Path, device: str = "auto"):
        import onnxruntime as ort

        providers = _providers(device, ort)
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            raise FaceSenseError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from exc
        meta = read_metadata(self.session.get_modelmeta().custom_metadata_map.get(META_KEY), path)
        self.classes = meta["classes"]
        self.pre = Preprocess(meta["img_size"], meta["channels"], meta["norm_mean"], meta["norm_std"],
                              tuple(meta["source_shape"]), meta["source_channels"])
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.contiguous().numpy()})[0]


def _providers(device: str, ort) -> list[str]:
    """onnxruntime's execution providers for --device: CUDA first when asked for (or auto and present)."""
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device != "auto":
            raise FaceSenseError(f"--device {device}: this onnxruntime has no CUDA provider "
                                 f"(install onnxruntime-gpu); use --device cpu")
    elif device not in ("auto", "cpu"):
        raise FaceSenseError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return providers


def load_classifier(path: Path | str, device: str = "auto") -> Classifier:
    """A checkpoint (.pt) or an exported .onnx; a clear one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FaceSenseError(f"--model {path}: no such file")
    if path.suffix.lower() == ".onnx":
        return OnnxClassifier(path, device)
    if _is_torchscript(path):
        raise FaceSenseError(f"--model {path}: a TorchScript export; predict takes the checkpoint it came from "
                             f"(.pt) or an .onnx export")
    return TorchClassifier(path, device)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript export is a zip holding export.py's metadata as the extra file <name>/extra/facesense.json."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("extra/" + META_KEY + ".json") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
