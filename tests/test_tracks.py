"""Tracks and smoothing on video: IoU linking, track ends, the smoothed label, summary and annotated id."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from facesense.cli import app
from facesense.infer.tracks import Smoother, Tracker
from predict_helpers import astronaut_bgr, make_checkpoint, read_jsonl

cv2 = pytest.importorskip("cv2")


def test_boxes_are_linked_by_overlap_and_tracks_end_when_unseen():
    tracker = Tracker(max_missed=2)
    a, b = (10, 10, 60, 60), (200, 10, 250, 60)
    assert tracker.update([a, b]) == [1, 2]
    assert tracker.update([(204, 12, 254, 62), (14, 10, 64, 60)]) == [2, 1]  # moved a little, order swapped
    assert tracker.update([(18, 10, 68, 60)]) == [1]  # face 2 missed once
    assert tracker.update([(20, 10, 70, 60), (206, 12, 256, 62)]) == [1, 2]  # back within max_missed
    for _ in range(3):
        tracker.update([])
    assert tracker.update([(20, 10, 70, 60)]) == [3]  # unseen 3 > 2 frames: a new track
    assert tracker.update([(400, 300, 450, 350)]) == [4]  # no overlap: new


def test_smoother_averages_the_last_window_per_track():
    smooth = Smoother(window=2)
    np.testing.assert_allclose(smooth(1, [1.0, 0.0]), [1.0, 0.0])
    np.testing.assert_allclose(smooth(2, [0.0, 1.0]), [0.0, 1.0])  # another track: its own history
    np.testing.assert_allclose(smooth(1, [0.0, 1.0]), [0.5, 0.5])
    np.testing.assert_allclose(smooth(1, [0.2, 0.8]), [0.1, 0.9])  # the first frame has left the window


def noisy_portrait_video(path, frames: int = 30, seed: int = 0):
    """The astronaut with noise, a random exposure (x0.7-1.3) and a shift of a few pixels per frame: the
    expression never changes, so every change of a track's label is flicker."""
    rng = np.random.default_rng(seed)
    image = astronaut_bgr().astype(np.float32)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (512, 512))
    for _ in range(frames):
        dx, dy = rng.integers(-6, 7, 2)
        frame = np.roll(image, (int(dy), int(dx)), axis=(0, 1)) * rng.uniform(0.7, 1.3) + \
            rng.normal(0, 25, image.shape)
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    return path


def changes(labels: list[str]) -> int:
    return sum(a != b for a, b in zip(labels, labels[1:]))


def test_smoothing_cuts_label_flicker_and_the_summary_lists_tracks(tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", seed=0)
    video = noisy_portrait_video(tmp_path / "noisy.mp4")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(video), "--model", str(ckpt), "--out", str(out),
                                      "--smooth", "8", "--save-annotated"])
    assert result.exit_code == 0, result.output
    recs = [r for r in read_jsonl(out / "predictions.jsonl") if r["box"] is not None]
    assert len(recs) >= 25 and all("track" in r for r in recs)
    main = max({r["track"] for r in recs}, key=lambda t: sum(r["track"] == t for r in recs))
    track = [r for r in recs if r["track"] == main]
    for r in track:
        assert r["frame_label"] == max(r["probs"], key=r["probs"].get)  # raw per-frame probs kept
        assert r["label"] == max(r["smooth_probs"], key=r["smooth_probs"].get)
    raw, smoothed = changes([r["frame_label"] for r in track]), changes([r["label"] for r in track])
    assert raw >= 4, f"the noise should make the per-frame label flicker ({raw} changes)"
    assert smoothed * 2 <= raw, (raw, smoothed)
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{video}: dominant emotion"))
    first, last = track[0]["time_s"], track[-1]["time_s"]
    dominant = max(set(r["label"] for r in track), key=[r["label"] for r in track].count)
    assert any(line == f"  track {main}: {first:g}-{last:g} s, {dominant} ({[r['label'] for r in track].count(dominant)}"
               f" of {len(track)} frames)" for line in lines[at + 1:]), result.output


def test_video_lines_without_smooth_keep_their_label_and_get_a_track(tmp_path):
    from predict_helpers import write_video

    ckpt = make_checkpoint(tmp_path / "tiny.pt")
    video = write_video(tmp_path / "clip.mp4", frames=6)
    result = CliRunner().invoke(app, ["predict", str(video), "--model", str(ckpt), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    recs = read_jsonl(tmp_path / "o" / "predictions.jsonl")
    assert [r["track"] for r in recs] == [1] * 6  # the drifting face is one track
    assert all("frame_label" not in r and r["label"] == max(r["probs"], key=r["probs"].get) for r in recs)
    assert "  track 1: 0-0.5 s," in result.output


def test_annotated_frames_show_the_track_id_and_smoothed_label():
    from facesense.infer.sinks import annotate, label_text

    probs = {"happy": 0.2, "sad": 0.8}
    rec = {"box": [10, 40, 110, 140], "label": "happy", "probs": probs, "track": 3,
           "smooth_probs": {"happy": 0.7, "sad": 0.3}}
    assert label_text(rec) == "#3 happy 70%"
    assert label_text({"box": [0, 0, 1, 1], "label": "sad", "probs": probs}) == "sad 80%"  # a photo: no track
    image = annotate(np.zeros((200, 200, 3), np.uint8), [rec])
    wide = annotate(np.zeros((200, 200, 3), np.uint8), [{**rec, "track": 12345}])
    assert (image[:40] != wide[:40]).any()  # the id is drawn in the label above the box
