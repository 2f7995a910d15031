"""Where annotated frames go: an annotated image, an annotated MP4, a window (--show), or nowhere.

Each source gets one sink, chosen once by `_Run.open_sink` (predict.py). Annotated images are
written when their batch is classified, possibly while a later source is being read, so their
errors are reported under their own name; an MP4 replaces its path only when the whole video
went in (`video_sink`, through `core.files.atomic_path`).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from facesense.core.errors import FaceSenseError
from facesense.core.files import atomic_path, write_bytes
from facesense.infer.faces import to_gray

Sink = Callable[[np.ndarray], None]  # takes a source's annotated BGR frames, in order
WINDOW = "facesense predict"


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """A decoded picture as an 8-bit BGR image to draw on: an 8-bit BGR one itself, not a copy (the
    caller has no further use for it, and a 24 MP frame held twice is 72 MB more)."""
    import cv2

    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR) if image.shape[2] == 4 else image
    return cv2.cvtColor(to_gray(image), cv2.COLOR_GRAY2BGR)


def label_text(rec: dict) -> str:
    """"happy 87%", or "#3 happy 87%" on a tracked face (the track's smoothed label and probability)."""
    probs = rec.get("smooth_probs") or rec["probs"]
    text = f"{rec['label']} {probs[rec['label']]:.0%}"
    return f"#{rec['track']} {text}" if rec.get("track") is not None else text


def annotate(image: np.ndarray, records: list[dict]) -> np.ndarray:
    """Boxes and their label_text drawn onto the BGR image."""
    import cv2

    thick = max(1, round(max(image.shape[:2]) / 400))
    for rec in records:
        if rec["box"] is None:
            continue
        x1, y1, x2, y2 = rec["box"]
        text = label_text(rec)
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 255, 0), thick + 1)
        scale = max(0.4, (x2 - x1) / 200)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = y1 - 4 if y1 - th - base - 4 >= 0 else y2 + th + 4  # above the box, or below at the top edge
        cv2.rectangle(image, (x1, ty - th - 4), (x1 + tw + 4, ty + base), (0, 255, 0), -1)
        cv2.putText(image, text, (x1 + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return image


def write_image(path: Path, image: np.ndarray) -> None:
    """Encode by `path`'s suffix and write it whole (atomic)."""
    import cv2

    make_parent(path)
    ok, data = cv2.imencode(path.suffix, image)
    if not ok:
        raise FaceSenseError(f"{path}: cannot encode the annotated image")
    write_bytes(path, data.tobytes())


def make_parent(path: Path) -> None:
    """`path`'s folder, made if missing; one FaceSenseError line when it cannot be (read-only, a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FaceSenseError(f"{path}: cannot create its folder {exc.filename or path.parent} "
                             f"({exc.strerror or exc})") from exc


class ImageSink:
    """An image source's annotated copy; `name()` gives its path on that first write (a picture that
    could not be read takes no name, so the names are those a picture-by-picture run gives)."""

    def __init__(self, name: Callable[[], Path], report: Callable[[str], None]):
        self.name, self.report = name, report

    def __call__(self, image: np.ndarray) -> None:
        try:
            write_image(self.name(), image)
        except FaceSenseError as exc:
            self.report(str(exc))


class VideoSink:
    """A video's annotated frames -> the MP4 at `tmp`; the first error is kept for `video_sink` to raise."""

    def __init__(self, tmp: Path, path: Path, fps: float):
        self.tmp, self.path, self.fps = tmp, path, fps
        self.writer, self.error, self.closed = None, None, False

    def __call__(self, frame: np.ndarray) -> None:
        if self.closed or self.error is not None:  # a failed or finished video takes no more frames
            return
        if self.writer is None:
            try:
                self.writer = self._open(frame.shape[1], frame.shape[0])
            except FaceSenseError as exc:
                self.error = exc
                return
            if not self.writer.isOpened():
                self.error = FaceSenseError(f"{self.path}: OpenCV cannot write an MP4 here")
                return
        self.writer.write(frame)

    def _open(self, width: int, height: int):
        import cv2

        make_parent(self.path)
        return cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))

    def release(self) -> None:
        self.closed = True
        if self.writer is not None:
            self.writer.release()


@contextmanager
def video_sink(path: Path, fps: float, drain: Callable[[], None]) -> Iterator[VideoSink]:
    """A VideoSink whose MP4 replaces `path` only when the whole video went in; removed on any failure.

    `drain` (the batcher's flush) runs before the file is completed: held frames reach it first.
    """
    with atomic_path(path, keep_suffix=True) as tmp:  # keep_suffix: OpenCV picks the container by it
        sink = VideoSink(tmp, path, fps)
        try:
            yield sink
            drain()
        finally:
            sink.release()
        if sink.error is not None:
            raise sink.error


def check_display() -> None:
    """--show needs a window: one FaceSenseError line where none can open (no display, or a headless OpenCV)."""
    import cv2

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise FaceSenseError("--show: no display here (DISPLAY is not set); use --save-annotated to write "
                             "annotated videos instead")
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    except cv2.error as exc:
        raise FaceSenseError(f"--show: OpenCV cannot open a window ({str(exc).strip().splitlines()[-1]}); "
                             f"opencv-python-headless has no GUI: use --save-annotated") from exc


def show(image: np.ndarray) -> None:
    """One annotated frame in the --show window (1 ms for the window to draw itself)."""
    import cv2

    cv2.imshow(WINDOW, image)
    cv2.waitKey(1)


def tee(*sinks: Sink | None) -> Sink | None:
    """One sink feeding each given one; None when none is given."""
    sinks = [s for s in sinks if s is not None]
    if len(sinks) <= 1:
        return sinks[0] if sinks else None
    return lambda image: [s(image) for s in sinks] and None
