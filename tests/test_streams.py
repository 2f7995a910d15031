"""Cameras and streams through a stand-in capture (these machines have no camera): lines written as they
come, --max-frames, a stop that keeps everything, one-line errors for a camera that cannot open and --show."""
from __future__ import annotations

import os

import numpy as np
import pytest
from typer.testing import CliRunner

from facesense.cli import app
from predict_helpers import astronaut_bgr, make_checkpoint, read_jsonl

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


class StandInCapture:
    """cv2.VideoCapture's interface over a generator of frames; `on_read(k)` runs before the k-th read."""

    def __init__(self, frames, on_read=lambda k: None, opened: bool = True):
        self.frames, self.on_read, self.opened, self.reads = iter(frames), on_read, opened, 0
        self.released = False

    def isOpened(self):
        return self.opened

    def read(self):
        self.on_read(self.reads)
        self.reads += 1
        frame = next(self.frames, None)
        return frame is not None, frame

    def grab(self):
        return self.read()[0]

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self):
        self.released = True


def portrait_frames(n=None):
    image = astronaut_bgr()
    k = 0
    while n is None or k < n:
        yield np.roll(image, 2 * k, axis=1)
        k += 1


def use_capture(monkeypatch, capture):
    from facesense.infer import sources

    opened = []

    def open_capture(target):
        opened.append(target)
        return capture

    monkeypatch.setattr(sources, "open_capture", open_capture)
    return opened


def predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def test_camera_index_reads_until_max_frames(tmp_path, ckpt, monkeypatch):
    capture = StandInCapture(portrait_frames())  # an endless camera
    opened = use_capture(monkeypatch, capture)
    result = predict("0", "--model", ckpt, "--out", tmp_path / "out", "--max-frames", "5", "--vid-stride", "2")
    assert result.exit_code == 0, result.output
    assert opened == [0] and capture.released  # the index as a camera number, released at the end
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [r["frame"] for r in recs] == [0, 2, 4, 6, 8] and {r["track"] for r in recs} == {1}
    assert all(r["source"] == "0" and r["time_s"] >= 0 for r in recs)
    assert "0: dominant emotion" in result.output


def test_stream_url_lines_are_flushed_as_they_come(tmp_path, ckpt, monkeypatch):
    out = tmp_path / "out"
    seen = []

    def on_read(k):  # before each read: the lines of every earlier frame are already on disk
        (tmp,) = [p for p in out.iterdir() if p.name.startswith(".predictions.jsonl.tmp-")]
        seen.append(len(tmp.read_text().splitlines()))

    use_capture(monkeypatch, StandInCapture(portrait_frames(4), on_read))
    result = predict("rtsp://camera.local/live", "--model", ckpt, "--out", out, "--save-annotated")
    assert result.exit_code == 0, result.output
    assert seen == [0, 1, 2, 3, 4]
    assert len(read_jsonl(out / "predictions.jsonl")) == 4
    assert (out / "annotated" / "camera.local_live.mp4").is_file()


def test_a_stop_ends_the_stream_and_keeps_its_lines(tmp_path, ckpt, monkeypatch):
    def on_read(k):
        if k == 3:
            raise KeyboardInterrupt  # Ctrl-C (SIGTERM is turned into the same) while waiting for a frame

    use_capture(monkeypatch, StandInCapture(portrait_frames(), on_read))
    photo = tmp_path / "after.png"
    cv2.imwrite(str(photo), astronaut_bgr())
    result = predict("0", photo, "--model", ckpt, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [r["frame"] for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")] == [0, 1, 2]
    assert "warning: camera 0: stopped (interrupted)" in result.output
    assert "the 1 sources after it were not read" in result.output
    assert (tmp_path / "out" / "predictions.meta.json").is_file()


def test_a_camera_that_cannot_open_is_one_line_naming_it(tmp_path, ckpt, monkeypatch):
    use_capture(monkeypatch, StandInCapture([], opened=False))
    result = predict("3", "--model", ckpt, "--out", tmp_path / "out")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: camera 3: cannot be opened") and len(errors) == 2  # + "1 of 1 failed"


def test_show_without_a_display_is_one_line_before_any_work(tmp_path, ckpt, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = predict("0", "--model", ckpt, "--out", tmp_path / "out", "--show")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: --show:"), result.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("DISPLAY", ":99")  # a display named, but this OpenCV is headless: still one line
    result = predict("0", "--model", ckpt, "--out", tmp_path / "out", "--show")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: --show:"), result.output


def test_api_video_takes_an_iterable_of_frames(ckpt):
    from facesense import Recognizer

    frames = list(Recognizer(ckpt, device="cpu").video(portrait_frames(6), stride=2, smooth=2))
    assert [f.index for f in frames] == [0, 2, 4]
    assert [[face.track for face in f.faces] for f in frames] == [[1], [1], [1]]
    assert all(face.smooth_probs is not None for f in frames for face in f.faces)
