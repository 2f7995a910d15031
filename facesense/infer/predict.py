"""`facesense predict`: a trained model on photos, folders and videos -> one JSON line per face.

The loop: sources (image files, folders searched recursively in sorted order, video
files) -> frames (`load_frames`: an image is one frame, a video every --vid-stride'th
frame; both as (frame index, time_s, picture)) -> face boxes and 48x48 crops
(`faces.py`) -> batches of --batch-size crops -> the model -> `predictions.jsonl`, in
source order. Each source also gets one sink, chosen once: nothing, an annotated-image
writer or an annotated-MP4 writer (--save-annotated). Only crops wait for a batch, plus
the frames being annotated (at most MAX_HELD_BYTES of them: counted in bytes, not frames,
since one 24 MP photo weighs as much as 80 VGA frames), so memory stays small on long
videos and big photos alike.

One line per face: source (the path as given; a folder's files as folder/relative path),
frame (video frame index; null for images), time_s (video lines only), box [x1, y1, x2,
y2] in source pixels, label and probs (class -> probability, all classes). A picture or
sampled frame without a face gets one line whose box, label and probs are null.

A source that cannot be read (or whose annotated copy cannot be written) gets a one-line
error naming it and the others go on; the caller exits non-zero when any failed. A video
that ends before the frame count its container states gets a warning (a truncated file).

--out is protected as train and eval protect theirs (`prepare_out`): a DIR holding an
earlier run's predictions.jsonl or annotated files is refused unless --overwrite, which
deletes only those; predict never reads its own DIR/annotated/ (skipped when a source
folder holds it). predictions.jsonl and every annotated file are written through
`core.files.atomic_path`, so an interrupted run (Ctrl-C, SIGTERM) leaves no half file, and
the temporaries of a run killed outright (SIGKILL, power loss: pid gone) are removed by
the next run into the same DIR, as pack removes its stale partials.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from facesense.core.errors import FaceSenseError
from facesense.core.files import atomic_path, require_dir, write_bytes
from facesense.infer.faces import DEFAULT_MARGIN, DETECTORS, HaarDetector, find_faces, read_image, to_gray
from pipeline.progress import Bar

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
# Bytes of annotated frames waiting for their batch's predictions: a few VGA frames' worth of batching
# for videos, while a 24 MP photo (72 MB as BGR) is drawn and written as soon as it is classified.
MAX_HELD_BYTES = 64 * 2**20
PREDICTIONS = "predictions.jsonl"
ANNOTATED = "annotated"  # subfolder of --out for --save-annotated copies
ANNOTATED_EXTS = IMAGE_EXTS + (".mp4",)  # what predict writes under annotated/ (and --overwrite deletes)
# atomic_path's temporaries (.NAME.tmp-PID, .STEM.tmp-PID.SUFFIX) and FaceSense <= 79297b0's
# .predictions.jsonl.partial-PID: the pid tells a live run's from a killed one's.
TEMPORARY = re.compile(r"^\..+\.(?:tmp|partial)-(\d+)(?:\.[A-Za-z0-9]+)?$")
VIDEO_SHORT_TOLERANCE = 1  # frames a container's stated count may exceed what decodes (MKV estimates it)
VIDEO_FPS_UNKNOWN = 25.0  # annotated MP4 rate when the container states none

Sink = Callable[[np.ndarray], None]  # takes a source's annotated BGR frames, in order


@dataclass
class Source:
    path: str  # as given (folder members: the folder as given / relative path)
    kind: str  # "image" or "video"
    rel: str  # name of its annotated copy under DIR/annotated/


@dataclass
class PredictOptions:
    detector: str = "haar"  # haar, or none (every picture is already a face crop)
    min_face: int = 48  # smallest face side, in source pixels, that the detector looks for
    margin: float = DEFAULT_MARGIN  # crop margin around a detector box, fraction of its side per side
    save_annotated: bool = False  # write annotated images / MP4s under DIR/annotated/
    vid_stride: int = 1  # classify every Nth video frame
    batch_size: int = 64  # crops per model call
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    overwrite: bool = False  # replace an earlier run's predictions.jsonl and annotated files in --out

    def check(self) -> None:
        """One-line FaceSenseError for an option out of range (--min-face is the detector's to check)."""
        if self.detector not in DETECTORS:
            raise FaceSenseError(f"--detector {self.detector!r}: expected one of {', '.join(DETECTORS)}")
        for name in ("vid_stride", "batch_size"):
            if getattr(self, name) < 1:
                raise FaceSenseError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not -0.4 <= self.margin <= 2:
            raise FaceSenseError(f"--margin {self.margin}: expected -0.4 to 2 (fraction of the face box side "
                                 f"added on each side; negative crops inside the box)")


@dataclass
class PredictSummary:
    """What a run did: counts for the summary lines, and one message per failed source."""

    sources: int = 0
    failed: list[str] = field(default_factory=list)  # one error message per failed source
    warnings: list[str] = field(default_factory=list)  # what was read but may be incomplete or skipped
    frames: int = 0  # pictures + sampled video frames classified
    faces: int = 0
    no_face: int = 0  # pictures / sampled frames without a face
    labels: Counter = field(default_factory=Counter)  # faces per label
    videos: dict = field(default_factory=dict)  # video source -> {label: faces}, from its first frame on
    ignored: int = 0  # files in folders that are neither images nor videos
    seconds: float = 0.0

    def count_frame(self, source: str, index: int | None, faces: int) -> None:
        self.frames += 1
        self.faces += faces
        self.no_face += not faces
        if index is not None:  # a video frame
            self.videos.setdefault(source, Counter())

    def count_face(self, rec: dict) -> None:
        """A face record once labelled."""
        self.labels[rec["label"]] += 1
        if rec["frame"] is not None:
            self.videos[rec["source"]][rec["label"]] += 1


@dataclass
class Expanded:
    """What the SRC arguments name: sources in order, one error per unusable SRC, and what was left out."""

    sources: list[Source] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ignored: int = 0  # files in folders that are neither images nor videos (FIFOs and sockets included)
    warnings: list[str] = field(default_factory=list)


def expand_sources(srcs: list[str], out: Path | None = None) -> Expanded:
    """Sources in order; `out`'s annotated/ (predict's own output) is never among them."""
    found = Expanded()
    own = _real(out / ANNOTATED) if out is not None else None
    supported = IMAGE_EXTS + VIDEO_EXTS
    for src in srcs:
        p = Path(src)
        if own is not None and _real(p).is_relative_to(own):
            found.errors.append(f"{src}: inside {out / ANNOTATED}, this run's own output; not read")
        elif p.is_dir():
            _expand_folder(src, p, own, found)
        elif p.is_file():
            if p.suffix.lower() not in supported:
                found.errors.append(f"{src}: not an image ({', '.join(IMAGE_EXTS)}) or video "
                                    f"({', '.join(VIDEO_EXTS)})")
            else:
                found.sources.append(Source(src, _kind(p), p.name))
        else:
            found.errors.append(f"{src}: {_not_a_file(p)}")
    return found


def _expand_folder(src: str, p: Path, own: Path | None, found: Expanded) -> None:
    """A folder's pictures and videos, recursively in sorted order; `own` (--out/annotated) skipped."""
    supported = IMAGE_EXTS + VIDEO_EXTS
    entries = sorted(f for f in p.rglob("*") if not f.is_dir())
    skipped = [f for f in entries if own is not None and _real(f).is_relative_to(own)]
    if skipped:  # e.g. `predict SRC --out SRC --save-annotated` run twice: never classify our own copies
        found.warnings.append(f"{src}: skipped {own} ({len(skipped)} files), predict's own output; "
                              f"it is never read")
        entries = sorted(set(entries) - set(skipped))
    files = [f for f in entries if f.is_file()]  # FIFOs, sockets, broken links: never opened
    members = [f for f in files if f.suffix.lower() in supported]
    found.ignored += len(entries) - len(members)
    if not members:
        found.errors.append(f"{src}: no images ({', '.join(IMAGE_EXTS)}) or videos ({', '.join(VIDEO_EXTS)}) in it")
    for f in members:
        rel = f.relative_to(p).as_posix()
        found.sources.append(Source(os.path.join(src, rel), _kind(f), f"{p.resolve().name}/{rel}"))


def _real(p: Path) -> Path:
    """The path with symlinks resolved; unlike Path.resolve never raises, not even on a symlink loop."""
    return Path(os.path.realpath(p))


def _not_a_file(p: Path) -> str:
    """Why an SRC that is neither a regular file nor a folder is not read: say what it is."""
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        if p.is_symlink():
            return "a symbolic link loop" if exc.errno == errno.ELOOP else "a broken symbolic link"
        return "no such file or folder" if isinstance(exc, FileNotFoundError) else f"cannot read ({exc.strerror})"
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{kind}, not an image, video or folder; not read"


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_EXTS else "image"


def load_frames(src: Source, stride: int, warn: Callable[[str], None] = lambda message: None
                ) -> Iterator[tuple[int | None, float | None, np.ndarray]]:
    """(frame index, time in s, decoded picture) for each frame to classify; an image is one frame (None, None, it).

    FaceSenseError naming the source when it cannot be read; `warn` hears of a video cut short.
    """
    if src.kind == "image":
        yield None, None, read_image(src.path)
    else:
        yield from video_frames(src.path, stride, warn)


def video_frames(path: str, stride: int, warn: Callable[[str], None] = lambda message: None):
    """(frame index, time in s, BGR frame) for every stride'th frame; FaceSenseError if none decodes.

    A video that ends before the frame count its container states (a truncated AVI or MKV still
    opens and decodes up to the cut) is reported to `warn`: its lines cover only the frames before it.
    """
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise FaceSenseError(f"{path}: cannot open as a video (broken file or unsupported codec)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    stated = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    index = 0
    try:
        while True:
            if index % stride == 0:
                ok, frame = cap.read()
                if not ok:
                    break
                yield index, round(index / fps, 3) if fps > 0 else None, frame
            elif not cap.grab():  # skipped frames are demuxed/decoded but not converted
                break
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise FaceSenseError(f"{path}: no frame could be decoded (broken or empty video)")
    if index + VIDEO_SHORT_TOLERANCE < stated:
        warn(f"{path}: ends after {index} of the {stated} frames its container states (truncated or damaged "
             f"file?); only those {index} were read")


def video_info(path: str) -> tuple[float, int]:
    """(frames per second, frame count as the container states it; 0 when unknown)."""
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        return (cap.get(cv2.CAP_PROP_FPS) or 0.0), max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        cap.release()


def frame_records(source: str, index: int | None, time_s: float | None, boxes: list) -> list[dict]:
    """A frame's lines, label and probs still unset: one per box, or one with box null when no face."""
    base = {"source": source, "frame": index}
    if index is not None:
        base["time_s"] = time_s
    return [{**base, "box": list(b), "label": None, "probs": None} for b in boxes] or \
        [{**base, "box": None, "label": None, "probs": None}]


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """A decoded picture as an 8-bit BGR image to draw on: an 8-bit BGR one itself, not a copy (the
    caller has no further use for it, and a 24 MP frame held twice is 72 MB more)."""
    import cv2

    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR) if image.shape[2] == 4 else image
    return cv2.cvtColor(to_gray(image), cv2.COLOR_GRAY2BGR)


def annotate(image: np.ndarray, records: list[dict]) -> np.ndarray:
    """Boxes and "label 87%" drawn onto a BGR copy."""
    import cv2

    thick = max(1, round(max(image.shape[:2]) / 400))
    for rec in records:
        if rec["box"] is None:
            continue
        x1, y1, x2, y2 = rec["box"]
        text = f"{rec['label']} {rec['probs'][rec['label']]:.0%}"
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
    """An image source's annotated copy. It is written when its batch is classified, possibly while a
    later source is being read, so its error is reported here, under its own name.

    `name()` gives its path on that first write: a picture that could not be read takes no name
    (sinks are called in source order, so the names are those a picture-by-picture run gives).
    """

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


@dataclass
class _Held:
    """One frame waiting for its batch: its lines, the crops of its face lines (same order), what to annotate."""

    records: list[dict]
    faces: list[dict]  # the records with a box, one per crop
    crops: np.ndarray  # (len(faces), 48, 48) uint8
    image: np.ndarray | None = None  # BGR copy to draw on, given with its sink
    sink: Sink | None = None


class Batcher:
    """Crops wait here for a full batch; records are written (and frames annotated) in arrival order."""

    def __init__(self, classifier, out_file, batch_size: int, on_face: Callable[[dict], None]):
        self.classifier, self.out_file, self.batch_size, self.on_face = classifier, out_file, batch_size, on_face
        self.pending: list[_Held] = []
        self.n_crops = self.held_bytes = 0

    def add(self, records: list[dict], crops: np.ndarray, image: np.ndarray | None = None,
            sink: Sink | None = None) -> None:
        """One frame's records and the crops of those with a box; `image` goes to `sink` once annotated."""
        faces = [rec for rec in records if rec["box"] is not None]
        if len(faces) != len(crops):
            raise ValueError(f"{len(faces)} face records but {len(crops)} crops")
        self.pending.append(_Held(records, faces, crops, image, sink))
        self.n_crops += len(crops)
        self.held_bytes += image.nbytes if image is not None else 0
        if self.n_crops >= self.batch_size or self.held_bytes >= MAX_HELD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Classify every waiting crop, write the lines, hand annotated frames to their sinks."""
        pending, self.pending, self.n_crops, self.held_bytes = self.pending, [], 0, 0  # taken first: never twice
        crops = [held.crops for held in pending if len(held.crops)]
        if not crops:
            probs = np.empty((0, len(self.classifier.classes)))
        else:
            probs = self.classifier.probs(np.concatenate(crops))
        ends = np.cumsum([len(held.crops) for held in pending])
        for held, end in zip(pending, ends):
            for rec, p in zip(held.faces, probs[end - len(held.crops):end], strict=True):
                self._label(rec, p)
        lines = [json.dumps(rec) for held in pending for rec in held.records]
        if lines:
            self.out_file.write("\n".join(lines) + "\n")
        for held in pending:
            if held.image is not None:
                held.sink(annotate(held.image, held.records))

    def _label(self, rec: dict, p: np.ndarray) -> None:
        classes = self.classifier.classes
        rec["label"] = classes[int(p.argmax())]
        rec["probs"] = {name: round(float(v), 6) for name, v in zip(classes, p)}
        self.on_face(rec)


class FrameBar(Bar):
    """Frames (pictures + sampled video frames) done of all, with frames/s and faces/s; the source's name first."""

    def __init__(self, enabled: bool, console, total: int | None):
        super().__init__("{task.fields[name]}", "{task.fields[fps]} frames/s  {task.fields[faces]} faces/s",
                         enabled=enabled, console=console, transient=True)
        self.restart(total or None, name="", fps="-", faces="-")
        self.start, self.frames, self.faces = time.perf_counter(), 0, 0

    def source(self, src: Source) -> None:
        if self.enabled:
            self.update(name=Path(src.path).name[-30:])

    def frame(self, faces: int) -> None:
        if not self.enabled:
            return
        self.frames += 1
        self.faces += faces
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.update(advance=1, fps=f"{self.frames / dt:,.1f}", faces=f"{self.faces / dt:,.1f}")


def frames_total(sources: list[Source], stride: int) -> int:
    """Frames a run will classify, from the containers' frame counts (0 where a video states none)."""
    return sum(1 if s.kind == "image" else -(-video_info(s.path)[1] // stride) for s in sources)


class _Run:
    """One predict run: each source's frames -> detector -> batcher, and the source's sink."""

    def __init__(self, opts: PredictOptions, detector, batcher: Batcher, bar: FrameBar, summary: PredictSummary,
                 out: Path, say: _Say):
        self.opts, self.detector, self.batcher, self.bar = opts, detector, batcher, bar
        self.summary, self.out, self.report, self.warn = summary, out, say.error, say.warning
        self.taken: set[str] = set()  # annotated names given out so far

    def source(self, src: Source) -> None:
        """Every frame of `src`; its failure is reported and the run goes on."""
        self.bar.source(src)
        try:
            with self.open_sink(src) as sink:
                for index, time_s, image in load_frames(src, self.opts.vid_stride, self.warn):
                    self.frame(src, index, time_s, image, sink)
        except FaceSenseError as exc:
            self.report(str(exc))

    def frame(self, src: Source, index: int | None, time_s: float | None, image: np.ndarray,
              sink: Sink | None) -> None:
        boxes, crops = find_faces(to_gray(image), self.detector, self.opts.margin)
        self.summary.count_frame(src.path, index, len(boxes))
        records = frame_records(src.path, index, time_s, boxes)
        self.batcher.add(records, crops, to_bgr8(image) if sink else None, sink)
        self.bar.frame(len(boxes))

    def open_sink(self, src: Source):
        """The source's sink, chosen once, as a context manager: None, an ImageSink or a VideoSink."""
        if not self.opts.save_annotated:
            return nullcontext(None)
        if src.kind == "image":
            return nullcontext(ImageSink(lambda: self.annotated_path(src, Path(src.path).suffix), self.report))
        fps = (video_info(src.path)[0] or VIDEO_FPS_UNKNOWN) / self.opts.vid_stride  # the sampled rate
        return video_sink(self.annotated_path(src, ".mp4"), fps, drain=self.batcher.flush)

    def annotated_path(self, src: Source, suffix: str) -> Path:
        """DIR/annotated/<name>, unique within the run (a second photo.jpg becomes photo_1.jpg)."""
        rel = Path(src.rel).with_suffix(suffix)
        name, k = rel.as_posix(), 0
        while name in self.taken:
            k += 1
            name = rel.with_name(f"{rel.stem}_{k}{suffix}").as_posix()
        self.taken.add(name)
        return self.out / ANNOTATED / name


class _Say:
    """Per-source errors and warnings: kept in the summary and printed at once, one line each."""

    def __init__(self, console, summary: PredictSummary):
        self.console, self.summary = console, summary

    def error(self, message: str) -> None:
        self.summary.failed.append(message)
        self.console.print(f"error: {message}", markup=False, soft_wrap=True)

    def warning(self, message: str) -> None:
        self.summary.warnings.append(message)
        self.console.print(f"warning: {message}", markup=False, soft_wrap=True)


def predict(srcs: list[str], model: Path, out: Path, opts: PredictOptions, progress: bool = True,
            console=None) -> PredictSummary:
    """Run the model over every source; errors per source go into summary.failed (and to the console).

    Every check (options, --out, --model) passes before anything in --out is deleted or written.
    """
    from rich.console import Console

    from facesense.infer.classifier import load_classifier

    opts.check()
    detector = HaarDetector(opts.min_face) if opts.detector == "haar" else None
    out = require_dir(out)
    earlier = earlier_outputs(out, opts.overwrite)
    classifier = load_classifier(model, opts.device)  # a wrong --model fails here, before any work
    found = expand_sources(srcs, out)
    summary = PredictSummary(sources=len(found.sources) + len(found.errors), ignored=found.ignored)
    console = console or Console(stderr=True, highlight=False)
    say = _Say(console, summary)
    for message in found.errors:
        say.error(message)
    for message in found.warnings:
        say.warning(message)
    open_out(out, earlier)
    show = progress and console.is_terminal
    start = time.perf_counter()
    with atomic_path(out / PREDICTIONS) as tmp, open(tmp, "w") as fh, \
            FrameBar(show, console, frames_total(found.sources, opts.vid_stride) if show else None) as bar:
        batcher = Batcher(classifier, fh, opts.batch_size, summary.count_face)
        run = _Run(opts, detector, batcher, bar, summary, out, say)
        for src in found.sources:
            run.source(src)
        batcher.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def earlier_outputs(out: Path, overwrite: bool) -> list[Path]:
    """An earlier run's predictions.jsonl and annotated pictures/videos in `out`: refused unless
    `overwrite` (then returned, for `open_out` to delete once every other check has passed)."""
    found = [out / PREDICTIONS] if (out / PREDICTIONS).is_file() else []
    annotated = sorted(f for f in (out / ANNOTATED).rglob("*") if f.is_file() and not f.is_symlink()
                       and f.suffix.lower() in ANNOTATED_EXTS and not TEMPORARY.match(f.name))
    found += annotated
    if found and not overwrite:
        what = []
        if (out / PREDICTIONS) in found:
            with open(out / PREDICTIONS, "rb") as fh:
                lines = sum(1 for _ in fh)
            what.append(f"{PREDICTIONS} ({lines} line{'s' * (lines != 1)})")
        if annotated:
            what.append(f"{len(annotated)} annotated file{'s' * (len(annotated) != 1)}")
        raise FaceSenseError(f"--out {out}: holds an earlier run's {' and '.join(what)}; --overwrite replaces "
                             f"them (deleting those files only), or choose another --out")
    return found


def open_out(out: Path, earlier: list[Path]) -> None:
    """`out` made, a killed run's temporaries removed, `earlier` (see earlier_outputs) deleted."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FaceSenseError(f"--out {out}: cannot create {exc.filename or out} ({exc.strerror or exc}); "
                             f"choose another --out") from exc
    remove_stale_temporaries(out)
    try:
        for path in earlier:
            path.unlink(missing_ok=True)
        for folder in sorted({p.parent for p in earlier if p.parent != out}, key=lambda p: -len(p.parts)):
            while folder != out and folder.is_dir() and not any(folder.iterdir()):  # its files were ours
                folder.rmdir()
                folder = folder.parent
    except OSError as exc:
        raise FaceSenseError(f"--out {out}: cannot delete the earlier run's {exc.filename} "
                             f"({exc.strerror or exc})") from exc


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporaries that runs into `out` killed outright left (their pid is gone): in `out`
    and under its annotated/. A live run's (another predict into the same DIR) are left alone."""
    folders = [out] + [Path(root) for root, _, _ in os.walk(out / ANNOTATED)]
    for folder in folders:
        for path in folder.iterdir():
            match = TEMPORARY.match(path.name)
            if match and path.is_file() and _pid_gone(int(match.group(1))):
                path.unlink(missing_ok=True)


def _pid_gone(pid: int) -> bool:
    if pid == os.getpid():  # ours: atomic_path removes its own; one here is in use
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, someone else's
        return False
    return False


def summary_lines(summary: PredictSummary, out: Path) -> list[str]:
    """The short summary printed at the end: faces per label, each video's dominant emotion."""
    rate = summary.frames / summary.seconds if summary.seconds else 0.0
    lines = [f"{summary.faces} faces in {summary.frames} pictures/frames ({summary.no_face} without a face) "
             f"from {summary.sources - len(summary.failed)} of {summary.sources} sources, "
             f"{summary.seconds:.1f} s ({rate:,.1f} frames/s) -> {out / PREDICTIONS}"]
    if summary.labels:
        lines.append("faces per label: " + ", ".join(f"{k} {v}" for k, v in summary.labels.most_common()))
    for video, counts in summary.videos.items():
        if counts:
            label, n = counts.most_common(1)[0]
            lines.append(f"{video}: dominant emotion {label} ({n} of {sum(counts.values())} faces)")
        elif not any(msg.startswith(f"{video}:") for msg in summary.failed):
            lines.append(f"{video}: no faces found")
    if summary.ignored:
        lines.append(f"ignored {summary.ignored} files in folders that are not images or videos")
    if summary.warnings:
        lines.append(f"{len(summary.warnings)} warnings (above)")
    return lines
