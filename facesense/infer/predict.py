"""`facesense predict`: a trained model on photos, folders, videos and streams -> one JSON line per face.

The loop: sources (`sources.py`: image files, folders searched recursively in sorted order,
video files, cameras and stream URLs) -> frames (an image is one frame, a video or stream every
--vid-stride'th frame; (frame index, time_s, picture)) -> face boxes and crops at the size and channels
of the model's data (`Recognizer.detect`, the Python API's own path) -> tracks on video (`tracks.py`) -> batches of
--batch-size crops -> the model (`Recognizer.classify`) -> `predictions.jsonl`, in source order.
Each source also gets one sink, chosen once (`sinks.py`): nothing, an annotated-image writer or
an annotated-MP4 writer (--save-annotated), and/or a window (--show). Only crops wait for a
batch, plus the frames being annotated (at most MAX_HELD_BYTES of them: counted in bytes, not
frames, since one 24 MP photo weighs as much as 80 VGA frames), so memory stays small on long
videos and big photos alike. A stream's lines are written and flushed frame by frame; Ctrl-C or
SIGTERM on a stream ends it (and the run) normally, keeping every line so far.

One line per face: source (the path as given; a folder's files as folder/relative path; a
stream as given), frame (video frame index; null for images), time_s (video lines only), box
[x1, y1, x2, y2] in source pixels, label and probs (class -> probability, all classes); video
lines add track (the face's track id within its video) and, with --smooth N > 1, frame_label
(the frame's own label) and smooth_probs (the track's last N frames averaged), label then being
the smoothed one. A picture or sampled frame without a face gets one line whose box, label and
probs are null. Beside it, predictions.meta.json (`outdir.run_meta`) says which model, detector
and options made them.

A source that cannot be read (or whose annotated copy cannot be written) gets a one-line
error naming it and the others go on; the caller exits non-zero when any failed. A video
that ends before the frame count its container states gets a warning (a truncated file).
--out is protected as train and eval protect theirs (`outdir.py`).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from facesense.core.errors import FaceSenseError
from facesense.core.files import atomic_path, require_dir
from facesense.infer.faces import DEFAULT_MARGIN, DETECTORS
from facesense.infer.outdir import PREDICTIONS, earlier_outputs, open_out, run_meta, write_meta
from facesense.infer.recognizer import Recognizer, named_probs
from facesense.infer.sinks import ImageSink, Sink, annotate, check_display, show, tee, to_bgr8, video_sink
from facesense.infer.sources import (ANNOTATED, Source, expand_sources, frames_total, load_frames, stream_name,
                                     video_info)
from facesense.infer.tracks import Smoother, Tracker, TrackLog
from pipeline.progress import Bar

# Bytes of annotated frames waiting for their batch's predictions: a few VGA frames' worth of batching
# for videos, while a 24 MP photo (72 MB as BGR) is drawn and written as soon as it is classified.
MAX_HELD_BYTES = 64 * 2**20
VIDEO_FPS_UNKNOWN = 25.0  # annotated MP4 rate when the container states none (and for streams)


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
    smooth: int = 1  # a track's label from its last N sampled frames' mean probabilities (1: the frame's own)
    max_frames: int | None = None  # sampled frames read per video or stream at most
    show: bool = False  # annotated frames in a window as they are classified

    def check(self) -> None:
        """One-line FaceSenseError for an option out of range (--min-face is the detector's to check)."""
        if self.detector not in DETECTORS:
            raise FaceSenseError(f"--detector {self.detector!r}: expected one of {', '.join(DETECTORS)}")
        for name in ("vid_stride", "batch_size", "smooth", "max_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FaceSenseError(f"--{name.replace('_', '-')} {value}: must be at least 1")
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
    tracks: dict = field(default_factory=dict)  # video source -> {track id: TrackLog}
    untimed: set = field(default_factory=set)  # videos whose tracks are told in frames (no frame rate)
    ignored: int = 0  # files in folders that are neither images nor videos
    seconds: float = 0.0

    def count_frame(self, source: str, index: int | None, faces: int) -> None:
        self.frames += 1
        self.faces += faces
        self.no_face += not faces
        if index is not None:  # a video frame
            self.videos.setdefault(source, Counter())
            self.tracks.setdefault(source, {})

    def count_face(self, rec: dict) -> None:
        """A face record once labelled."""
        self.labels[rec["label"]] += 1
        if rec["frame"] is not None:
            self.videos[rec["source"]][rec["label"]] += 1
            when = rec.get("time_s")
            if when is None:
                self.untimed.add(rec["source"])
                when = rec["frame"]
            log = self.tracks[rec["source"]].setdefault(rec["track"], TrackLog(when, when))
            log.see(when, rec["label"])


def frame_records(source: str, index: int | None, time_s: float | None, boxes: list,
                  tracks: list[int] | None = None) -> list[dict]:
    """A frame's lines, label and probs still unset: one per box, or one with box null when no face;
    video lines carry their track id (null on a face-less line)."""
    base = {"source": source, "frame": index}
    if index is not None:
        base["time_s"] = time_s
    recs = [{**base, "box": list(b), "label": None, "probs": None} for b in boxes] or \
        [{**base, "box": None, "label": None, "probs": None}]
    if tracks is not None:
        for rec, track in zip(recs, list(tracks) + [None]):  # the face-less line's track is null
            rec["track"] = track
    return recs


@dataclass
class _Held:
    """One frame waiting for its batch: its lines, the crops of its face lines (same order), what to annotate."""

    records: list[dict]
    faces: list[dict]  # the records with a box, one per crop
    crops: np.ndarray  # (len(faces), H, W) gray or (len(faces), H, W, 3) RGB uint8: Recognizer.detect's
    image: np.ndarray | None = None  # BGR copy to draw on, given with its sink
    sink: Sink | None = None
    smoother: Smoother | None = None  # its video's, when its labels are smoothed


class Batcher:
    """Crops wait here for a full batch; records are written (and frames annotated) in arrival order."""

    def __init__(self, recognizer, out_file, batch_size: int, on_face: Callable[[dict], None]):
        self.recognizer, self.out_file, self.batch_size, self.on_face = recognizer, out_file, batch_size, on_face
        self.pending: list[_Held] = []
        self.n_crops = self.held_bytes = 0

    def add(self, records: list[dict], crops: np.ndarray, image: np.ndarray | None = None,
            sink: Sink | None = None, smoother: Smoother | None = None) -> None:
        """One frame's records and the crops of those with a box; `image` goes to `sink` once annotated."""
        faces = [rec for rec in records if rec["box"] is not None]
        if len(faces) != len(crops):
            raise ValueError(f"{len(faces)} face records but {len(crops)} crops")
        self.pending.append(_Held(records, faces, crops, image, sink, smoother))
        self.n_crops += len(crops)
        self.held_bytes += image.nbytes if image is not None else 0
        if self.n_crops >= self.batch_size or self.held_bytes >= MAX_HELD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Classify every waiting crop, write the lines, hand annotated frames to their sinks."""
        pending, self.pending, self.n_crops, self.held_bytes = self.pending, [], 0, 0  # taken first: never twice
        crops = [held.crops for held in pending if len(held.crops)]
        if not crops:
            probs = np.empty((0, len(self.recognizer.classes)))
        else:
            probs = self.recognizer.classify(np.concatenate(crops))
        ends = np.cumsum([len(held.crops) for held in pending])
        for held, end in zip(pending, ends):
            for rec, p in zip(held.faces, probs[end - len(held.crops):end], strict=True):
                self._label(rec, p, held.smoother)
        lines = [json.dumps(rec) for held in pending for rec in held.records]
        if lines:
            self.out_file.write("\n".join(lines) + "\n")
        for held in pending:
            if held.image is not None:
                held.sink(annotate(held.image, held.records))

    def _label(self, rec: dict, p: np.ndarray, smoother: Smoother | None) -> None:
        """Label and probs from p; a tracked face with smoothing on takes its track's smoothed label."""
        classes = self.recognizer.classes
        rec["label"] = classes[int(p.argmax())]
        rec["probs"] = named_probs(classes, p)
        if smoother is not None:
            smoothed = smoother(rec["track"], p)
            rec["frame_label"], rec["label"] = rec["label"], classes[int(smoothed.argmax())]
            rec["smooth_probs"] = named_probs(classes, smoothed)
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


class _Run:
    """One predict run: each source's frames -> detector -> tracks -> batcher, and the source's sink."""

    def __init__(self, opts: PredictOptions, recognizer, batcher: Batcher, bar: FrameBar, summary: PredictSummary,
                 out: Path, say: _Say):
        self.opts, self.recognizer, self.batcher, self.bar = opts, recognizer, batcher, bar
        self.summary, self.out, self.report, self.warn = summary, out, say.error, say.warning
        self.taken: set[str] = set()  # annotated names given out so far
        self.stopped = False  # a stream was interrupted: the run ends there, keeping its lines

    def source(self, src: Source) -> None:
        """Every frame of `src`; its failure is reported and the run goes on."""
        self.bar.source(src)
        video = src.kind != "image"
        tracker = Tracker() if video else None
        smoother = Smoother(self.opts.smooth) if video and self.opts.smooth > 1 else None
        try:
            with self.open_sink(src) as sink, \
                    closing(load_frames(src, self.opts.vid_stride, self.warn, self.opts.max_frames)) as frames:
                try:
                    for index, time_s, image in frames:
                        self.frame(src, index, time_s, image, sink, tracker, smoother)
                except KeyboardInterrupt:
                    if src.kind != "stream":
                        raise  # a file's run is all or nothing: atomic_path removes what it began
                    self.stopped = True
                    self.warn(f"{stream_name(src.path)}: stopped (interrupted); its lines so far are kept")
        except FaceSenseError as exc:
            self.report(str(exc))

    def frame(self, src: Source, index: int | None, time_s: float | None, image: np.ndarray,
              sink: Sink | None, tracker: Tracker | None, smoother: Smoother | None) -> None:
        boxes, crops = self.recognizer.detect(image)
        self.summary.count_frame(src.path, index, len(boxes))
        records = frame_records(src.path, index, time_s, boxes, tracker.update(boxes) if tracker else None)
        self.batcher.add(records, crops, to_bgr8(image) if sink else None, sink, smoother)
        if src.kind == "stream":  # a live stream's lines are written as they come: a stop loses nothing
            self.batcher.flush()
            self.batcher.out_file.flush()
        self.bar.frame(len(boxes))

    @contextmanager
    def open_sink(self, src: Source):
        """The source's sink, chosen once: None, an ImageSink or a VideoSink, and/or the --show window."""
        shown = show if self.opts.show else None
        if not self.opts.save_annotated:
            yield shown
        elif src.kind == "image":
            yield tee(ImageSink(lambda: self.annotated_path(src, Path(src.path).suffix), self.report), shown)
        else:
            rate = video_info(src.path)[0] if src.kind == "video" else 0.0  # a camera's stated rate is nominal
            fps = (rate or VIDEO_FPS_UNKNOWN) / self.opts.vid_stride  # the sampled rate
            with video_sink(self.annotated_path(src, ".mp4"), fps, drain=self.batcher.flush) as sink:
                yield tee(sink, shown)

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

    Every check (options, display, --out, --model) passes before anything in --out is deleted or written.
    """
    from rich.console import Console

    opts.check()
    if opts.show:
        check_display()
    out = require_dir(out)
    earlier = earlier_outputs(out, opts.overwrite)
    # the API's own object: a wrong --model (or --min-face) fails here, before any work
    recognizer = Recognizer(model, opts.device, detector=opts.detector, min_face=opts.min_face, margin=opts.margin,
                            batch_size=opts.batch_size)
    found = expand_sources(srcs, out)
    summary = PredictSummary(sources=len(found.sources) + len(found.errors), ignored=found.ignored)
    console = console or Console(stderr=True, highlight=False)
    say = _Say(console, summary)
    for message in found.errors:
        say.error(message)
    for message in found.warnings:
        say.warning(message)
    open_out(out, earlier)
    show_bar = progress and console.is_terminal
    total = frames_total(found.sources, opts.vid_stride, opts.max_frames) if show_bar else None
    start = time.perf_counter()
    with atomic_path(out / PREDICTIONS) as tmp, open(tmp, "w") as fh, FrameBar(show_bar, console, total) as bar:
        batcher = Batcher(recognizer, fh, opts.batch_size, summary.count_face)
        run = _Run(opts, recognizer, batcher, bar, summary, out, say)
        for k, src in enumerate(found.sources):
            run.source(src)
            if run.stopped and k + 1 < len(found.sources):
                say.warning(f"the {len(found.sources) - k - 1} sources after it were not read")
                break
        batcher.flush()
    summary.seconds = time.perf_counter() - start
    write_meta(out, run_meta(recognizer, opts, srcs))
    return summary


def summary_lines(summary: PredictSummary, out: Path) -> list[str]:
    """The short summary printed at the end: faces per label, each video's dominant emotion and tracks."""
    rate = summary.frames / summary.seconds if summary.seconds else 0.0
    lines = [f"{summary.faces} faces in {summary.frames} pictures/frames ({summary.no_face} without a face) "
             f"from {summary.sources - len(summary.failed)} of {summary.sources} sources, "
             f"{summary.seconds:.1f} s ({rate:,.1f} frames/s) -> {out / PREDICTIONS}"]
    if summary.labels:
        lines.append("faces per label: " + ", ".join(f"{k} {v}" for k, v in summary.labels.most_common()))
    for video, counts in summary.videos.items():
        if counts:
            label, n = counts.most_common(1)[0]
            tracks = summary.tracks.get(video, {})
            lines.append(f"{video}: dominant emotion {label} ({n} of {sum(counts.values())} faces)")
            unit = "frames" if video in summary.untimed else "s"
            lines += [log.line(track, unit) for track, log in sorted(tracks.items())]
        elif not any(msg.startswith(f"{video}:") for msg in summary.failed):
            lines.append(f"{video}: no faces found")
    if summary.ignored:
        lines.append(f"ignored {summary.ignored} files in folders that are not images or videos")
    if summary.warnings:
        lines.append(f"{len(summary.warnings)} warnings (above)")
    return lines
