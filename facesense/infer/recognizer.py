"""`from facesense import Recognizer`: the Python API, and the path `facesense predict` runs on.

    rec = Recognizer("model/best.pt")          # or an exported .onnx
    faces = rec("photo.jpg")                   # a path, a numpy array (BGR or gray) or a PIL image
    faces[0].box, faces[0].label, faces[0].probs
    probs = rec.classify(crops)                # (N, K) for faces already cropped (rec.detect's, or pictures)
    for frame in rec.video("clip.mp4", stride=2, smooth=5): ...

Detection, crops and preprocessing are faces.py's, as in `facesense predict` (which builds a
Recognizer and calls `detect` and `classify`); the classes, input size and channels, and the
size and channels faces are cropped at (the model's training data's: 48x48 gray for FER2013,
RGB for colour data), come from the model file.

Threads: a Recognizer may be called from several threads at once. The classifier is shared
(a PyTorch module in inference mode and an onnxruntime session both run concurrently), while
each thread gets its own Haar cascade, because OpenCV does not promise that one
CascadeClassifier may run detectMultiScale from two threads at once.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np

from facesense.core.errors import FaceSenseError
from facesense.infer.faces import (DEFAULT_MARGIN, DETECTORS, HaarDetector, find_faces, read_image, resize_face,
                                   to_source)
from facesense.infer.tracks import Smoother, Tracker

# Version of the record layout shared by predictions.jsonl lines, predictions.meta.json and Face.to_dict():
# 1 = source, frame, time_s, box, label, probs (+ track, frame_label, smooth_probs on video lines).
SCHEMA_VERSION = 1
IMAGE_DTYPES = (np.uint8, np.uint16)


@dataclass
class Face:
    """One face: its box [x1, y1, x2, y2] in the picture's pixels, label and probs (class -> probability).

    On video, `track` links it to the same face in other frames; with smoothing, `label` is the
    track's smoothed label, `frame_label` this frame's own and `smooth_probs` the averaged probabilities.
    """

    box: list[int]
    label: str
    probs: dict[str, float]
    track: int | None = None
    frame_label: str | None = None
    smooth_probs: dict[str, float] | None = None
    schema_version: ClassVar[int] = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class VideoFrame:
    """A sampled video frame: its index, time (None where unknown), the picture and its faces."""

    index: int
    time_s: float | None
    image: np.ndarray
    faces: list[Face] = field(default_factory=list)


def as_image(image, name: str = "image") -> np.ndarray:
    """A path, a numpy array (gray, BGR or BGRA; uint8 or uint16) or a PIL image -> a decoded array."""
    if isinstance(image, (str, Path)):
        return read_image(str(image))
    if type(image).__module__.startswith("PIL."):
        pil = image.convert("L" if image.mode in ("1", "L", "I;16", "I", "F") else "RGB")
        array = np.asarray(pil)
        return array if array.ndim == 2 else np.ascontiguousarray(array[:, :, ::-1])  # RGB -> BGR
    if not isinstance(image, np.ndarray):
        raise FaceSenseError(f"{name}: a {type(image).__name__}; expected a path, a numpy array or a PIL image")
    if image.dtype not in IMAGE_DTYPES:
        raise FaceSenseError(f"{name}: dtype {image.dtype}; expected uint8 (or uint16) pixels, e.g. "
                             f"(img * 255).astype(np.uint8) for floats in [0, 1]")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))) or min(image.shape[:2]) < 1:
        raise FaceSenseError(f"{name}: shape {image.shape}; expected (H, W) gray or (H, W, 3) BGR "
                             f"(or (H, W, 4) BGRA)")
    return image


class Recognizer:
    """A model and a face detector: pictures -> faces with their expression (see the module docstring)."""

    def __init__(self, model: str | Path, device: str = "auto", *, detector: str = "haar", min_face: int = 48,
                 margin: float = DEFAULT_MARGIN, batch_size: int = 256):
        from facesense.infer.classifier import load_classifier

        if detector not in DETECTORS:
            raise FaceSenseError(f"--detector {detector!r}: expected one of {', '.join(DETECTORS)}")
        if batch_size < 1:
            raise FaceSenseError(f"--batch-size {batch_size}: must be at least 1")
        self.detector_name, self.min_face, self.margin, self.batch_size = detector, min_face, margin, batch_size
        self._local = threading.local()
        self._detector()  # a bad min_face fails here, before the model loads
        self.model_path = Path(model)
        self.classifier = load_classifier(model, device)
        self._sha256 = None

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)

    @property
    def input_size(self) -> int:
        return self.classifier.pre.img_size

    @property
    def channels(self) -> int:
        return self.classifier.pre.channels

    @property
    def crop_shape(self) -> tuple[int, ...]:
        """One face crop's array shape: (H, W) gray or (H, W, 3) RGB, as the model's data held faces."""
        return self.classifier.pre.crop_shape

    def _detector(self) -> HaarDetector | None:
        """This thread's cascade (see the module docstring); None with detector "none"."""
        if self.detector_name == "none":
            return None
        if getattr(self._local, "detector", None) is None:
            self._local.detector = HaarDetector(self.min_face)
        return self._local.detector

    def detect(self, image) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
        """Face boxes in the picture and their (K, *crop_shape) uint8 crops (gray, or RGB for a colour model),
        made as training saw faces."""
        pre = self.classifier.pre
        return find_faces(as_image(image), self._detector(), self.margin, pre.source_shape, pre.source_channels)

    def classify(self, crops) -> np.ndarray:
        """(N, K) float64 probabilities for faces already cropped: a uint8 array of crop_shape crops (detect's:
        gray, or RGB for a colour model) is used as it is; any other array (N, H, W) or (N, H, W, C), or a list,
        is pictures (any size, gray or BGR), each resized whole to a crop; batched by batch_size."""
        crops = self._faces(crops)
        if not len(crops):
            return np.empty((0, len(self.classes)))
        parts = [self.classifier.probs(crops[k:k + self.batch_size]) for k in range(0, len(crops), self.batch_size)]
        return np.concatenate(parts)

    def _faces(self, crops) -> np.ndarray:
        pre = self.classifier.pre
        if isinstance(crops, np.ndarray) and crops.dtype == np.uint8 and crops.shape[1:] == pre.crop_shape:
            return crops  # the detector's own crops: as they are
        if isinstance(crops, np.ndarray) and crops.ndim in (3, 4):
            crops = list(crops)
        elif isinstance(crops, np.ndarray):
            raise FaceSenseError(f"crops: shape {crops.shape}; expected (N, H, W) gray or (N, H, W, 3) BGR faces, "
                                 f"or a list of pictures")
        if not crops:
            return np.empty((0, *pre.crop_shape), np.uint8)
        return np.stack([resize_face(to_source(as_image(c, f"crops[{k}]"), pre.source_channels), pre.source_shape)
                         for k, c in enumerate(crops)])

    def faces(self, boxes: list, probs: np.ndarray) -> list[Face]:
        """Face objects for boxes and their probabilities (rows of classify)."""
        classes = self.classes
        return [Face(list(map(int, b)), classes[int(p.argmax())], named_probs(classes, p)) for b, p in zip(boxes, probs)]

    def __call__(self, image) -> list[Face]:
        """The faces in one picture, largest first."""
        boxes, crops = self.detect(image)
        return self.faces(boxes, self.classify(crops))

    def video(self, source, stride: int = 1, smooth: int = 1, max_frames: int | None = None) -> Iterator[VideoFrame]:
        """Sampled frames of a video file, camera index, stream URL or iterable of pictures, with their
        faces linked into tracks; `smooth` > 1 labels a track from its last `smooth` frames' mean."""
        from facesense.infer.sources import as_frames, stream_frames, video_frames

        if stride < 1 or smooth < 1:
            raise FaceSenseError(f"stride {stride}, smooth {smooth}: both must be at least 1")
        if isinstance(source, int) or (isinstance(source, str) and (source.isdigit() or "://" in source)):
            frames = stream_frames(str(source), stride, max_frames)
        elif isinstance(source, (str, Path)):
            frames = video_frames(str(source), stride, max_frames=max_frames)
        else:
            frames = as_frames(source, stride, max_frames)
        tracker, smoother = Tracker(), Smoother(smooth)
        for index, time_s, image in frames:
            boxes, crops = self.detect(image)
            probs = self.classify(crops)
            faces = self.faces(boxes, probs)
            for face, track, p in zip(faces, tracker.update(boxes), probs):
                smooth_face(face, track, smoother(track, p), self.classes, smooth > 1)
            yield VideoFrame(index, time_s, image, faces)

    def model_info(self) -> dict:
        """The model as predictions.meta.json records it."""
        from pipeline.shards import sha256_file

        if self._sha256 is None:
            self._sha256 = sha256_file(self.model_path)
        pre = self.classifier.pre
        return {"file": str(self.model_path), "sha256": self._sha256, "format": type(self.classifier).__name__,
                "classes": self.classes, "input_size": pre.img_size, "channels": pre.channels,
                "norm_mean": pre.mean, "norm_std": pre.std, "source_shape": list(pre.source_shape),
                "source_channels": pre.source_channels}

    def detector_info(self) -> dict:
        import cv2

        info = {"name": self.detector_name, "min_face": self.min_face, "margin": self.margin}
        if self.detector_name == "haar":
            info.update(cascade="haarcascade_frontalface_default.xml", opencv=cv2.__version__)
        return info


def smooth_face(face: Face, track: int, smoothed: np.ndarray, classes: list[str], keep: bool) -> None:
    """Give `face` its track; with `keep` (smoothing on) its label becomes the track's smoothed one."""
    face.track = track
    if keep:
        face.frame_label, face.label = face.label, classes[int(smoothed.argmax())]
        face.smooth_probs = named_probs(classes, smoothed)


def named_probs(classes: list[str], p: np.ndarray) -> dict[str, float]:
    """class -> probability, rounded as predictions.jsonl and the API give them."""
    return {name: round(float(v), 6) for name, v in zip(classes, p)}
