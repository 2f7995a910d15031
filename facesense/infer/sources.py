"""What `facesense predict` reads: SRC arguments -> sources -> frames.

A source is an image file, a video file, or a live stream (a camera index such as `0`, or an
rtsp://, http:// or https:// URL). Folders are searched recursively in sorted order; files in
them that are neither images nor videos (FIFOs and sockets included) are counted, never
opened. Every source yields frames as (frame index, time_s, picture): an image is one frame
(None, None, it); a video every stride'th frame, timed by its container's rate; a stream every
stride'th frame until it ends, timed by the wall clock (a camera's stated rate is nominal).

Videos and streams are read through one capture interface (`isOpened`, `read`, `grab`, `get`,
`release`: OpenCV's VideoCapture), made by `open_capture`, so a stand-in capture (a generator of
frames behind the same methods) can take a camera's place in tests.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from facesense.core.errors import FaceSenseError
from facesense.infer.faces import read_image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
STREAM_SCHEMES = ("rtsp://", "http://", "https://")
ANNOTATED = "annotated"  # subfolder of --out for annotated copies: never read as a source
VIDEO_SHORT_TOLERANCE = 1  # frames a container's stated count may exceed what decodes (MKV estimates it)

Frame = tuple  # (frame index or None, time_s or None, decoded picture)


@dataclass
class Source:
    path: str  # as given (folder members: the folder as given / relative path; a stream: its index or URL)
    kind: str  # "image", "video" or "stream"
    rel: str  # name of its annotated copy under DIR/annotated/


@dataclass
class Expanded:
    """What the SRC arguments name: sources in order, one error per unusable SRC, and what was left out."""

    sources: list[Source] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ignored: int = 0  # files in folders that are neither images nor videos (FIFOs and sockets included)
    warnings: list[str] = field(default_factory=list)


def is_stream(src: str) -> bool:
    """A camera index (`0`) or a stream URL; a file named `0` is still a file when it exists."""
    return (src.isdigit() and not Path(src).exists()) or src.lower().startswith(STREAM_SCHEMES)


def stream_name(src: str) -> str:
    """How messages name a stream: `camera 0`, or the URL."""
    return f"camera {src}" if src.isdigit() else src


def expand_sources(srcs: list[str], out: Path | None = None) -> Expanded:
    """Sources in order; `out`'s annotated/ (predict's own output) is never among them."""
    found = Expanded()
    own = _real(out / ANNOTATED) if out is not None else None
    supported = IMAGE_EXTS + VIDEO_EXTS
    for src in srcs:
        p = Path(src)
        if is_stream(src):
            found.sources.append(Source(src, "stream", _stream_rel(src)))
        elif own is not None and _real(p).is_relative_to(own):
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


def _stream_rel(src: str) -> str:
    """The annotated MP4's name for a stream: camera0.mp4, or the URL's host and path made a file name."""
    if src.isdigit():
        return f"camera{src}.mp4"
    tail = src.split("://", 1)[1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in tail).strip("._")[:80] + ".mp4"


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


def open_capture(target: str | int):
    """An OpenCV VideoCapture of a file, camera index or URL (tests put a stand-in here)."""
    import cv2

    return cv2.VideoCapture(target)


def load_frames(src: Source, stride: int, warn: Callable[[str], None] = lambda message: None,
                max_frames: int | None = None) -> Iterator[Frame]:
    """(frame index, time in s, decoded picture) for each frame to classify; an image is one frame (None, None, it).

    FaceSenseError naming the source when it cannot be read; `warn` hears of a video cut short.
    """
    if src.kind == "image":
        yield None, None, read_image(src.path)
    elif src.kind == "stream":
        yield from stream_frames(src.path, stride, max_frames)
    else:
        yield from video_frames(src.path, stride, warn, max_frames)


def video_frames(path: str, stride: int, warn: Callable[[str], None] = lambda message: None,
                 max_frames: int | None = None) -> Iterator[Frame]:
    """(frame index, time in s, BGR frame) for every stride'th frame; FaceSenseError if none decodes.

    A video that ends before the frame count its container states (a truncated AVI or MKV still
    opens and decodes up to the cut) is reported to `warn`: its lines cover only the frames before it.
    """
    import cv2

    cap = open_capture(path)
    if not cap.isOpened():
        raise FaceSenseError(f"{path}: cannot open as a video (broken file or unsupported codec)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    stated = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    counted = [0]
    yield from capture_frames(cap, stride, max_frames, lambda i: round(i / fps, 3) if fps > 0 else None, counted)
    index = counted[0]
    if index == 0:
        raise FaceSenseError(f"{path}: no frame could be decoded (broken or empty video)")
    if max_frames is None and index + VIDEO_SHORT_TOLERANCE < stated:
        warn(f"{path}: ends after {index} of the {stated} frames its container states (truncated or damaged "
             f"file?); only those {index} were read")


def stream_frames(src: str, stride: int, max_frames: int | None = None) -> Iterator[Frame]:
    """A camera's or URL's every stride'th frame until it ends (or max_frames sampled), timed from its first."""
    cap = open_capture(int(src) if src.isdigit() else src)
    if not cap.isOpened():
        what = "no such camera, or it is in use" if src.isdigit() else "unreachable, or not a video stream"
        raise FaceSenseError(f"{stream_name(src)}: cannot be opened ({what})")
    start = time.monotonic()
    yield from capture_frames(cap, stride, max_frames, lambda i: round(time.monotonic() - start, 3), [0])


def capture_frames(cap, stride: int, max_frames: int | None, clock: Callable[[int], float | None],
                   counted: list[int]) -> Iterator[Frame]:
    """Every stride'th frame of an opened capture (released at the end); counted[0] = frames gone through."""
    index = sampled = 0
    try:
        while max_frames is None or sampled < max_frames:
            if index % stride == 0:
                ok, frame = cap.read()
                if not ok:
                    break
                sampled += 1
                yield index, clock(index), frame
            elif not cap.grab():  # skipped frames are demuxed/decoded but not converted
                break
            index += 1
            counted[0] = index
    finally:
        counted[0] = index
        cap.release()


def video_info(path: str) -> tuple[float, int]:
    """(frames per second, frame count as the container states it; 0 when unknown)."""
    import cv2

    cap = open_capture(path)
    try:
        return (cap.get(cv2.CAP_PROP_FPS) or 0.0), max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        cap.release()


def frames_total(sources: list[Source], stride: int, max_frames: int | None = None) -> int | None:
    """Frames a run will classify, from the containers' frame counts; None (unknown) with a stream."""
    if any(s.kind == "stream" for s in sources):
        return None
    cap = max_frames or float("inf")
    return sum(1 if s.kind == "image" else int(min(cap, -(-video_info(s.path)[1] // stride))) for s in sources)


def as_frames(frames, stride: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
    """An iterable of pictures (the API's own frames, e.g. a generator) as every stride'th (index, None, picture)."""
    sampled = 0
    for index, image in enumerate(frames):
        if max_frames is not None and sampled >= max_frames:
            return
        if index % stride == 0:
            sampled += 1
            yield index, None, np.asarray(image)
