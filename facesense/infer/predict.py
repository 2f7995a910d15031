"""`facesense predict`: a trained model on photos, folders and videos -> one JSON line per face.

The loop: sources (image files, folders searched recursively in sorted order, video
files) -> frames (every --vid-stride'th of a video) -> face boxes and 48x48 crops
(`faces.py`) -> batches of --batch-size crops -> the model -> `predictions.jsonl`, in
source order. Only crops wait for a batch, plus the frames being annotated (at most
MAX_HELD_FRAMES of them), so memory stays small on long videos.

One line per face: source (the path as given; a folder's files as folder/relative path),
frame (video frame index; null for images), time_s (video lines only), box [x1, y1, x2,
y2] in source pixels, label and probs (class -> probability, all classes). A picture or
sampled frame without a face gets one line whose box, label and probs are null.

A source that cannot be read gets a one-line error naming it and the others go on; the
caller exits non-zero when any failed. predictions.jsonl is written under a temporary
name and renamed when the run ends, so an interrupted run leaves no half file.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facesense.core.errors import FaceSenseError
from facesense.infer.faces import DEFAULT_MARGIN, DETECTORS, HaarDetector, find_faces, read_image, to_gray

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
MAX_HELD_FRAMES = 32  # annotated frames waiting for their batch's predictions
PREDICTIONS = "predictions.jsonl"
ANNOTATED = "annotated"  # subfolder of --out for --save-annotated copies


@dataclass
class Source:
    path: str  # as given (folder members: the folder as given / relative path)
    kind: str  # "image" or "video"
    rel: str  # name of its annotated copy under DIR/annotated/


@dataclass
class Options:
    detector: str = "haar"  # haar, or none (every picture is already a face crop)
    min_face: int = 48  # smallest face side, in source pixels, that the detector looks for
    margin: float = DEFAULT_MARGIN  # crop margin around a detector box, fraction of its side per side
    save_annotated: bool = False  # write annotated images / MP4s under DIR/annotated/
    vid_stride: int = 1  # classify every Nth video frame
    batch_size: int = 64  # crops per model call
    device: str = "auto"  # auto, cpu, cuda, cuda:N


@dataclass
class Report:
    sources: int = 0
    failed: list[str] = field(default_factory=list)  # one error message per failed source
    frames: int = 0  # pictures + sampled video frames classified
    faces: int = 0
    no_face: int = 0  # pictures / sampled frames without a face
    labels: Counter = field(default_factory=Counter)  # faces per label
    videos: dict = field(default_factory=dict)  # video source -> {label: faces}
    ignored: int = 0  # files in folders that are neither images nor videos
    seconds: float = 0.0


def expand_sources(srcs: list[str]) -> tuple[list[Source], list[str], int]:
    """Sources in order, one error per SRC that is missing/unsupported/empty, files ignored in folders."""
    sources, errors, ignored = [], [], 0
    supported = IMAGE_EXTS + VIDEO_EXTS
    for src in srcs:
        p = Path(src)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            members = [f for f in files if f.suffix.lower() in supported]
            ignored += len(files) - len(members)
            if not members:
                errors.append(f"{src}: no images ({', '.join(IMAGE_EXTS)}) or videos ({', '.join(VIDEO_EXTS)}) in it")
            for f in members:
                rel = f.relative_to(p).as_posix()
                sources.append(Source(os.path.join(src, rel), _kind(f), f"{p.resolve().name}/{rel}"))
        elif p.is_file():
            if p.suffix.lower() not in supported:
                errors.append(f"{src}: not an image ({', '.join(IMAGE_EXTS)}) or video ({', '.join(VIDEO_EXTS)})")
            else:
                sources.append(Source(src, _kind(p), p.name))
        else:
            errors.append(f"{src}: no such file or folder")
    return sources, errors, ignored


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_EXTS else "image"


def video_frames(path: str, stride: int):
    """(frame index, time in s, BGR frame) for every stride'th frame; FaceSenseError if none decodes."""
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise FaceSenseError(f"{path}: cannot open as a video (broken file or unsupported codec)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
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


def video_info(path: str) -> tuple[float, int]:
    """(frames per second, frame count as the container states it; 0 when unknown)."""
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        return (cap.get(cv2.CAP_PROP_FPS) or 0.0), max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        cap.release()


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """A decoded picture as a fresh 8-bit BGR image to draw on."""
    import cv2

    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR) if image.shape[2] == 4 else image.copy()
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
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, image)
    if not ok:
        raise FaceSenseError(f"{path}: cannot encode the annotated image")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data.tofile(tmp)
    os.replace(tmp, path)


class VideoOut:
    """An annotated MP4 written under a temporary name and renamed when the video is done."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self.writer = path, fps, None
        self.tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.mp4")  # OpenCV picks the container by suffix

    def write(self, frame: np.ndarray) -> None:
        import cv2

        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise FaceSenseError(f"{self.path}: OpenCV cannot write an MP4 here")
        self.writer.write(frame)

    def close(self, keep: bool) -> None:
        if self.writer is not None:
            self.writer.release()
            if keep:
                os.replace(self.tmp, self.path)
        self.tmp.unlink(missing_ok=True)


class Batcher:
    """Crops wait here for a full batch; records are written (and frames annotated) in arrival order."""

    def __init__(self, classifier, out_file, batch_size: int, report: Report):
        self.classifier, self.out_file, self.batch_size, self.report = classifier, out_file, batch_size, report
        self.pending: list[tuple[list[dict], tuple | None]] = []  # (records of one frame, (image, sink))
        self.crops: list[np.ndarray] = []
        self.n_crops = self.held = 0

    def add(self, records: list[dict], crops: np.ndarray, frame=None) -> None:
        self.pending.append((records, frame))
        if len(crops):
            self.crops.append(crops)
            self.n_crops += len(crops)
        self.held += frame is not None
        if self.n_crops >= self.batch_size or self.held >= MAX_HELD_FRAMES:
            self.flush()

    def flush(self) -> None:
        classes = self.classifier.classes
        probs = self.classifier.probs(np.concatenate(self.crops)) if self.crops else np.empty((0, len(classes)))
        k = 0
        lines = []
        for records, frame in self.pending:
            for rec in records:
                if rec["box"] is None:
                    continue
                p = probs[k]
                k += 1
                rec["label"] = classes[int(p.argmax())]
                rec["probs"] = {name: round(float(v), 6) for name, v in zip(classes, p)}
                self.report.labels[rec["label"]] += 1
                if rec["frame"] is not None:
                    self.report.videos[rec["source"]][rec["label"]] += 1
            lines.extend(json.dumps(rec) for rec in records)
            if frame is not None:
                image, sink = frame
                sink(annotate(image, records))
        if lines:
            self.out_file.write("\n".join(lines) + "\n")
        self.pending, self.crops, self.n_crops, self.held = [], [], 0, 0


def predict(srcs: list[str], model: Path, out: Path, opts: Options, progress: bool = True, console=None) -> Report:
    """Run the model over every source; errors per source go into report.failed (and to the console)."""
    from facesense.infer.classifier import load_classifier

    if opts.detector not in DETECTORS:
        raise FaceSenseError(f"--detector {opts.detector!r}: expected one of {', '.join(DETECTORS)}")
    for name in ("vid_stride", "batch_size"):
        if getattr(opts, name) < 1:
            raise FaceSenseError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be at least 1")
    if not -0.4 <= opts.margin <= 2:
        raise FaceSenseError(f"--margin {opts.margin}: expected -0.4 to 2 (fraction of the face box side added "
                             f"on each side; negative crops inside the box)")
    detector = HaarDetector(opts.min_face) if opts.detector == "haar" else None
    classifier = load_classifier(model, opts.device)  # a wrong --model fails here, before any work
    sources, errors, ignored = expand_sources(srcs)
    report = Report(sources=len(sources) + len(errors), ignored=ignored)

    from rich.console import Console

    console = console or Console(stderr=True, highlight=False)

    def error(message: str) -> None:
        report.failed.append(message)
        console.print(f"error: {message}", markup=False, soft_wrap=True)

    for message in errors:
        error(message)
    out.mkdir(parents=True, exist_ok=True)
    final = out / PREDICTIONS
    partial = out / f".{PREDICTIONS}.partial-{os.getpid()}"
    annotated_names: set[str] = set()
    start = time.perf_counter()
    try:
        with open(partial, "w") as fh, _Progress(progress and console.is_terminal, console, sources,
                                                  opts.vid_stride) as bar:
            batcher = Batcher(classifier, fh, opts.batch_size, report)
            for src in sources:
                bar.source(src)
                video_out = None
                try:
                    if src.kind == "image":
                        frames = [(None, None, read_image(src.path))]
                    else:
                        frames = video_frames(src.path, opts.vid_stride)
                        report.videos[src.path] = Counter()
                        if opts.save_annotated:
                            fps = video_info(src.path)[0] or 25.0
                            video_out = VideoOut(_annotated_path(out, src, annotated_names, ".mp4"),
                                                 fps / opts.vid_stride)
                    for index, t, image in frames:
                        boxes, crops = find_faces(to_gray(image), detector, opts.margin)
                        base = {"source": src.path, "frame": index}
                        if index is not None:
                            base["time_s"] = t
                        records = [{**base, "box": list(b), "label": None, "probs": None} for b in boxes] or \
                                  [{**base, "box": None, "label": None, "probs": None}]
                        report.frames += 1
                        report.faces += len(boxes)
                        report.no_face += not boxes
                        frame = None
                        if opts.save_annotated:
                            sink = video_out.write if video_out else \
                                _image_sink(_annotated_path(out, src, annotated_names, Path(src.path).suffix))
                            frame = (to_bgr8(image), sink)
                        batcher.add(records, crops, frame)
                        bar.advance(len(boxes))
                    if video_out:
                        batcher.flush()
                        video_out.close(keep=True)
                except FaceSenseError as exc:
                    if video_out:
                        batcher.flush()
                        video_out.close(keep=False)
                    error(str(exc))
            batcher.flush()
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


def _annotated_path(out: Path, src: Source, taken: set[str], suffix: str) -> Path:
    """DIR/annotated/<name>, unique within the run (a second photo.jpg becomes photo_1.jpg)."""
    rel = Path(src.rel).with_suffix(suffix)
    name, k = rel.as_posix(), 0
    while name in taken:
        k += 1
        name = rel.with_name(f"{rel.stem}_{k}{suffix}").as_posix()
    taken.add(name)
    return out / ANNOTATED / name


def _image_sink(path: Path):
    return lambda image: write_image(path, image)


class _Progress:
    """A rich bar over frames (pictures + sampled video frames) with frames/s and faces/s; off when not a terminal."""

    def __init__(self, enabled: bool, console, sources: list[Source], stride: int):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        total = sum(1 if s.kind == "image" else -(-video_info(s.path)[1] // stride) for s in sources)
        self.bar = Progress(TextColumn("{task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[fps]} frames/s  {task.fields[faces]} faces/s"),
                            TimeRemainingColumn(), console=console, transient=True)
        self.task = self.bar.add_task("predict", total=total or None, name="", fps="-", faces="-")
        self.start, self.frames, self.faces = time.perf_counter(), 0, 0

    def __enter__(self):
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()

    def source(self, src: Source) -> None:
        if self.enabled:
            self.bar.update(self.task, name=Path(src.path).name[-30:])

    def advance(self, faces: int) -> None:
        if not self.enabled:
            return
        self.frames += 1
        self.faces += faces
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, advance=1, fps=f"{self.frames / dt:,.1f}", faces=f"{self.faces / dt:,.1f}")


def summary_lines(report: Report, out: Path) -> list[str]:
    """The short summary printed at the end: faces per label, each video's dominant emotion."""
    rate = report.frames / report.seconds if report.seconds else 0.0
    lines = [f"{report.faces} faces in {report.frames} pictures/frames ({report.no_face} without a face) "
             f"from {report.sources - len(report.failed)} of {report.sources} sources, "
             f"{report.seconds:.1f} s ({rate:,.1f} frames/s) -> {out / PREDICTIONS}"]
    if report.labels:
        lines.append("faces per label: " + ", ".join(f"{k} {v}" for k, v in report.labels.most_common()))
    for video, counts in report.videos.items():
        if counts:
            label, n = counts.most_common(1)[0]
            lines.append(f"{video}: dominant emotion {label} ({n} of {sum(counts.values())} faces)")
        elif not any(msg.startswith(f"{video}:") for msg in report.failed):
            lines.append(f"{video}: no faces found")
    if report.ignored:
        lines.append(f"ignored {report.ignored} files in folders that are not images or videos")
    return lines


