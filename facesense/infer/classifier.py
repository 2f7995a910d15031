"""A trained model ready for inference: a FaceSense checkpoint (PyTorch) or an exported .onnx.

Both give the same thing: the class names, how a 48x48 face becomes the model's input
(`faces.Preprocess`, from the checkpoint's config or the ONNX file's metadata), and
`probs(crops)` -> class probabilities. The ONNX path runs on onnxruntime alone: no timm,
no model code (torch only prepares the input tensor, with eval's own function).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from facesense.core.errors import FaceSenseError
from facesense.infer.faces import Preprocess, model_input

META_KEY = "facesense"  # ONNX metadata_props key / TorchScript extra file holding the JSON below
META_FORMAT, META_VERSION = "facesense-export", 1


def metadata(ckpt: dict, cfg, which: str, sha256: str) -> dict:
    """What inference needs to know about an exported model (stored in the exported file)."""
    return {"format": META_FORMAT, "version": META_VERSION, "classes": list(ckpt["classes"]),
            "img_size": cfg.img_size, "channels": cfg.channels, "norm_mean": cfg.norm_mean,
            "norm_std": cfg.norm_std, "face_size": 48, "model": cfg.model, "weights": which,
            "checkpoint_sha256": sha256, "epoch": ckpt.get("epoch"), "step": ckpt.get("step")}


class Classifier:
    classes: list[str]
    pre: Preprocess
    kind: str  # "pytorch" or "onnx"

    def logits(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def probs(self, crops: np.ndarray) -> np.ndarray:
        """(N, 48, 48) uint8 faces -> (N, K) float64 probabilities (softmax of the logits)."""
        z = self.logits(model_input(crops, self.pre)).astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


class TorchClassifier(Classifier):
    kind = "pytorch"

    def __init__(self, path: Path, device: str = "auto"):
        from facesense.core.checkpoint import eval_weights, load_checkpoint
        from facesense.core.config import config_from_dict
        from facesense.core.model import create_model
        from facesense.core.runtime import setup

        ckpt = load_checkpoint(path)
        cfg = config_from_dict(ckpt["config"], str(path))
        self.device = setup(device, deterministic=False).device
        weights, self.weights = eval_weights(ckpt)  # the EMA when the run kept one
        self.model = create_model(cfg.model, cfg.channels, len(ckpt["classes"]))
        self.model.load_state_dict(weights)
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.classes = list(ckpt["classes"])
        self.pre = Preprocess(cfg.img_size, cfg.channels, cfg.norm_mean, cfg.norm_std)
        self.ckpt, self.cfg = ckpt, cfg

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()


class OnnxClassifier(Classifier):
    kind = "onnx"

    def __init__(self, path: Path, device: str = "auto"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            if "CUDAExecutionProvider" in available:
                providers.insert(0, "CUDAExecutionProvider")
            elif device != "auto":
                raise FaceSenseError(f"--device {device}: this onnxruntime has no CUDA provider "
                                     f"(install onnxruntime-gpu) ; use --device cpu")
        elif device not in ("auto", "cpu"):
            raise FaceSenseError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            raise FaceSenseError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from exc
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        meta = read_metadata(raw, path)
        self.classes = meta["classes"]
        self.pre = Preprocess(meta["img_size"], meta["channels"], meta["norm_mean"], meta["norm_std"])
        self.input_name = self.session.get_inputs()[0].name
        self.meta = meta

    def logits(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.contiguous().numpy()})[0]


def read_metadata(raw: str | None, path: Path) -> dict:
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
    try:
        return TorchClassifier(path, device)
    except FaceSenseError as exc:
        raise FaceSenseError(f"--model {exc}; expected a FaceSense checkpoint (.pt) or an exported .onnx") from exc


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("extra/" + META_KEY + ".json") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
