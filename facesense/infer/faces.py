"""Faces in ordinary pictures: reading, detection, cropping, and the model's input tensor.

The crop has to look like what training saw: the faces of the model's data, at their size
and channels (the checkpoint's `source`: FER2013's are 48x48 gray, RAF-DB's 100x100 colour),
which the loaders resize to the model's input size and normalise inside one function. So a
face here becomes: detector box -> a crop around it with a margin, square for square data (of
the data's aspect otherwise), border replicated where it leaves the picture, as the
augmentation does -> gray (ITU-R 601 luma, as Pillow's "L" used by `facesense pack`) for a
gray model, RGB for a colour one (OpenCV pictures are BGR) -> the source's H x W uint8 (area
averaging when shrinking) -> `model_input`: the augmentation spec's reference implementation
(`kernels.reference.augment_reference`) with identity parameters, i.e. resize to the model's
input size, channels and normalisation, no augmentation. Eval's loaders run faster engines
of the same spec (the fused CPU path, the Triton kernel on CUDA), and those are tested
against this reference, so a face here is prepared as eval prepares it without a second copy.

Detection: OpenCV's frontal-face Haar cascade, whose weights ship inside the
opencv-python-headless wheel (nothing is downloaded). The picture is shrunk before detecting,
so that the smallest face asked for (`min_face`) becomes the cascade's 24-px window, and so
that its long side is at most MAX_DETECT_SIDE (a 24 MP photo is searched for faces of at
least 1/53 of its long side, not for 48-px ones: the tiny windows found only false faces
there, and took seconds). Boxes lying mostly inside a larger box (an eye or a mouth found
as a face inside the face) are dropped. No histogram equalisation: the cascade normalises
each window's contrast itself, and equalising a picture lost faces. Measured by
`benchmarks/bench_detect.py` (benchmarks/results/detect-cpu.json): of 400 FER2013 val faces
upscaled to 192 px on grey 640x480 canvases, the cascade run on the picture as is finds 283
(37 ms a picture), shrunk first 281 (14 ms), equalised 217, shrunk and equalised (this
detector before) 225; dimmed to 35% (the exposure equalising was for) the same. On 24 and
64 MP pictures (the astronaut on blurred noise) the detector before found 4 to 12 false faces each, in 3-4 s;
now 0 to 2, in under a second.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from facesense.core.errors import FaceSenseError
from pipeline.classes import FACE_SIZE  # FER2013's side: the source of models that record none

# FFmpeg's own log lines ("moov atom not found") would precede our one-line error for a broken
# video; silence them (read when cv2 loads, so before any import of it).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

# Margin added on each side of the detector's square box, as a fraction of its side. Measured
# (`facesense bench margin`, benchmarks/results/margin-cpu.json): all 3,589 val faces upscaled 3x
# onto a grey canvas; the cascade finds 2,277; its box is 0.94 of a FER picture's side (median),
# centred within a pixel, so the box itself already frames a face as FER2013 does. Accuracy of
# those faces: 61.3% cropped at margin 0 (60.5% at 0.05, 57.5% at 0.1, 57.9% at -0.1, 48.8% at 0.2)
# vs 63.1% for the same faces as packed.
DEFAULT_MARGIN = 0.0
CASCADE_WINDOW = 24  # the frontal-face cascade's own window side in pixels
DETECTORS = ("haar", "none")
# Long side, in pixels, of the picture the cascade runs on (MAX_DETECT_SIDE) and the share of a box's
# area inside a larger box that makes it part of that face (NESTED_FRACTION): measured in
# benchmarks/bench_detect.py, see the module docstring.
MAX_DETECT_SIDE = 1280
NESTED_FRACTION = 0.5


@dataclass(frozen=True)
class Preprocess:
    """How a face is cropped and becomes the model's input: from the checkpoint or the ONNX metadata."""

    img_size: int  # model input side (crops are resized source_shape -> img_size in model_input)
    channels: int  # model input channels: 1 gray; 3 RGB, or gray replicated for a gray source
    mean: float  # normalisation mean on the [0, 1] scale
    std: float  # normalisation std on the [0, 1] scale
    source_shape: tuple[int, int] = (FACE_SIZE, FACE_SIZE)  # (H, W) of the faces trained on: crops are made so
    source_channels: int = 1  # 1: gray crops; 3: RGB crops

    @property
    def crop_shape(self) -> tuple[int, ...]:
        """One crop's array shape: (H, W) gray or (H, W, 3) RGB."""
        return tuple(self.source_shape) + ((3,) if self.source_channels == 3 else ())


def model_input(crops: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(N, H, W) gray or (N, H, W, 3) RGB uint8 faces -> (N, C, S, S) float32 normalised: the spec's
    reference with identity parameters (what eval's fast engines are tested to equal), on the CPU."""
    from kernels.reference import augment_reference
    from kernels.spec import OutputSpec, identity_params

    assert crops.dtype == np.uint8 and (crops.ndim == 3 or (crops.ndim == 4 and crops.shape[3] == 3)), \
        "crops must be (N, H, W) or (N, H, W, 3) uint8"
    images = torch.from_numpy(np.ascontiguousarray(crops))
    spec = OutputSpec(size=pre.img_size, channels=pre.channels, mean=(pre.mean,), std=(pre.std,))
    return augment_reference(images, torch.arange(len(images)), identity_params(len(images)), spec)


def _to_8bit(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        return cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return image


def to_gray(image: np.ndarray) -> np.ndarray:
    """Any decoded picture (gray, BGR, BGRA; 8 or 16 bit) -> 2-D uint8 gray."""
    import cv2

    image = _to_8bit(image)
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any decoded picture (gray, BGR, BGRA; 8 or 16 bit) -> (H, W, 3) uint8 RGB, the order colour shards
    keep (OpenCV decodes BGR); gray is replicated."""
    import cv2

    image = _to_8bit(image)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def to_source(image: np.ndarray, channels: int) -> np.ndarray:
    """A decoded picture in the channels a model's faces have: gray (1) or RGB (3)."""
    return to_gray(image) if channels == 1 else to_rgb(image)


def read_image(path: str) -> np.ndarray:
    """Decode an image file upright, as a viewer shows it (its EXIF orientation applied, whatever its
    mode), keeping gray gray and 16 bits 16 bits; FaceSenseError naming it if it cannot be read.

    IMREAD_ANYCOLOR | IMREAD_ANYDEPTH is the one OpenCV mode that applies the orientation without
    forcing 3 channels 8 bits (IMREAD_UNCHANGED ignores it); only an alpha channel is dropped, which
    the gray crops never used.
    """
    import cv2

    try:
        data = np.fromfile(path, np.uint8)  # imdecode, not imread: non-ASCII paths work too
    except OSError as exc:
        raise FaceSenseError(f"{path}: cannot read ({exc.strerror})") from exc
    image = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise FaceSenseError(f"{path}: not a readable image (corrupt, empty or another kind of file)")
    return image


def resize_face(face: np.ndarray, size: int | tuple[int, int] = FACE_SIZE) -> np.ndarray:
    """A gray (H, W) or RGB (H, W, 3) crop -> size (a side, or (height, width)); area averaging when
    shrinking (no aliasing), bilinear when growing.

    A crop of another aspect (a user's own face crop, --detector none) is resized whole, as
    `facesense pack --resize` does.
    """
    import cv2

    height, width = (size, size) if isinstance(size, int) else size
    if face.shape[:2] == (height, width):
        return face
    shrink = face.shape[0] > height and face.shape[1] > width
    return cv2.resize(face, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def square_crop(image: np.ndarray, box: tuple[int, int, int, int], margin: float,
                aspect: float = 1.0) -> np.ndarray:
    """The square around box [x1, y1, x2, y2], grown by `margin` x side on each side; border replicated.
    aspect (width / height) != 1: the rectangle of that aspect holding that square, for data whose faces
    are not square. Gray (H, W) or colour (H, W, C) pictures alike."""
    import cv2

    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    nw = max(1, int(round(side * max(1.0, aspect))))
    nh = max(1, int(round(side * max(1.0, 1 / aspect))))
    left, top = int(round(cx - nw / 2)), int(round(cy - nh / 2))
    h, w = image.shape[:2]
    pad = max(0, -left, -top, left + nw - w, top + nh - h)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return image[top + pad:top + pad + nh, left + pad:left + pad + nw]


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (shipped in the wheel), boxes in source pixels."""

    def __init__(self, min_face: int = 48, scale_factor: float = 1.1, min_neighbors: int = 5,
                 max_side: int = MAX_DETECT_SIDE):
        import cv2

        if min_face < CASCADE_WINDOW:
            raise FaceSenseError(f"--min-face {min_face}: must be at least {CASCADE_WINDOW} pixels "
                                 f"(the cascade's window)")
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise FaceSenseError(f"cannot load OpenCV's face cascade {path}; reinstall opencv-python-headless<5")
        self.min_face, self.scale_factor, self.min_neighbors = min_face, scale_factor, min_neighbors
        self.max_side = max_side

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the picture is detected at: min_face -> the cascade's window, long side <= max_side."""
        f = min(1.0, CASCADE_WINDOW / self.min_face, self.max_side / max(width, height))
        return max(1, round(width * f)), max(1, round(height * f))

    def __call__(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes [x1, y1, x2, y2] in `gray`'s pixels, largest first; none in a picture too small to
        hold a face of min_face pixels (the cascade cannot even be run on it)."""
        import cv2

        h, w = gray.shape
        sw, sh = self.working_size(w, h)
        if min(sw, sh) < CASCADE_WINDOW:
            return []
        small = cv2.resize(gray, (sw, sh), interpolation=cv2.INTER_AREA) if (sw, sh) != (w, h) else gray
        found = self.cascade.detectMultiScale(small, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(CASCADE_WINDOW, CASCADE_WINDOW))
        fx, fy = w / sw, h / sh
        boxes = [(max(0, int(round(x * fx))), max(0, int(round(y * fy))),
                  min(w, int(round((x + bw) * fx))), min(h, int(round((y + bh) * fy))))
                 for x, y, bw, bh in (found if len(found) else [])]
        return drop_nested(sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])))


def drop_nested(boxes: list[tuple[int, int, int, int]], inside: float = NESTED_FRACTION) -> list:
    """Boxes (largest first) without those lying mostly (`inside` of their area) within a larger kept box.

    The cascade's own grouping merges boxes of similar size only; a feature of a big face (an eye,
    the mouth) found as a small face stays inside it.
    """
    kept = []
    for b in boxes:
        area = (b[2] - b[0]) * (b[3] - b[1])
        if not any(_overlap(b, k) >= inside * area for k in kept):
            kept.append(b)
    return kept


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def find_faces(image: np.ndarray, detector: HaarDetector | None, margin: float = DEFAULT_MARGIN,
               shape: tuple[int, int] = (FACE_SIZE, FACE_SIZE),
               channels: int = 1) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """Boxes found in a decoded picture (gray or BGR) and their crops made as the model's data holds faces:
    (K, H, W) gray or (K, H, W, 3) RGB uint8 for shape (H, W) and channels 1 or 3. Detection runs on gray;
    with no detector the whole picture is the face."""
    gray = to_gray(image)
    faces = gray if channels == 1 else to_rgb(image)
    if detector is None:
        h, w = gray.shape
        return [(0, 0, w, h)], resize_face(faces, shape)[None]
    boxes = detector(gray)
    aspect = shape[1] / shape[0]
    crops = np.stack([resize_face(square_crop(faces, b, margin, aspect), shape) for b in boxes]) if boxes else \
        np.empty((0, *shape) + ((3,) if channels == 3 else ()), np.uint8)
    return boxes, crops

