"""facesense predict: real photo and video, folders, bad inputs, and parity with eval's preprocessing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facesense.cli import app
from pipeline.classes import FER2013_CLASSES
from predict_helpers import (ASTRONAUT_FACE_CENTRE, ASTRONAUT_FACE_SIDE, FER, fer_val, make_checkpoint,
                             read_jsonl, write_astronaut, write_video)

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def run(*args: str):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def check_probs(rec: dict) -> None:
    assert list(rec["probs"]) == list(FER2013_CLASSES)
    assert abs(sum(rec["probs"].values()) - 1) < 1e-4
    assert rec["label"] == max(rec["probs"], key=rec["probs"].get)


def test_astronaut_photo_one_face_in_place(tmp_path, ckpt):
    photo = write_astronaut(tmp_path / "in" / "astronaut.png")
    result = run(photo, "--model", ckpt, "--out", tmp_path / "out", "--save-annotated")
    assert result.exit_code == 0, result.output
    (rec,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert rec["source"] == str(photo) and rec["frame"] is None and "time_s" not in rec
    x1, y1, x2, y2 = rec["box"]
    cx, cy = ASTRONAUT_FACE_CENTRE
    assert abs((x1 + x2) / 2 - cx) < 15 and abs((y1 + y2) / 2 - cy) < 15
    assert 0.7 * ASTRONAUT_FACE_SIDE < x2 - x1 < 1.4 * ASTRONAUT_FACE_SIDE
    check_probs(rec)
    annotated = cv2.imread(str(tmp_path / "out" / "annotated" / "astronaut.png"))
    assert annotated is not None and annotated.shape == (512, 512, 3)
    # the box was drawn (green) where the face is, and nothing else changed far from it
    original = cv2.imread(str(photo))
    assert tuple(annotated[y2, (x1 + x2) // 2]) == (0, 255, 0)
    assert (annotated[400:, :100] == original[400:, :100]).all()
    assert "faces per label: " + rec["label"] + " 1" in result.output


def test_video_one_face_per_sampled_frame(tmp_path, ckpt):
    video = write_video(tmp_path / "clip.mp4", frames=9, fps=10.0)
    result = run(video, "--model", ckpt, "--out", tmp_path / "out", "--vid-stride", "3", "--save-annotated")
    assert result.exit_code == 0, result.output
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [r["frame"] for r in recs] == [0, 3, 6]
    assert [r["time_s"] for r in recs] == [0.0, 0.3, 0.6]
    for i, rec in enumerate(recs):
        check_probs(rec)
        x1, _, x2, _ = rec["box"]
        assert abs((x1 + x2) / 2 - (ASTRONAUT_FACE_CENTRE[0] + 4 * rec["frame"])) < 15  # follows the drift
    cap = cv2.VideoCapture(str(tmp_path / "out" / "annotated" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == (512, 512, 3)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10 / 3, rel=0.01)
    dominant = max(FER2013_CLASSES, key=lambda c: sum(r["label"] == c for r in recs))
    assert f"{video}: dominant emotion {dominant}" in result.output


def test_folder_recursive_sorted_with_bad_files(tmp_path, ckpt):
    src = tmp_path / "photos"
    write_astronaut(src / "b" / "astronaut.jpg")
    (src / "a").mkdir()
    cv2.imwrite(str(src / "a" / "blank.png"), np.full((200, 300), 90, np.uint8))  # no face in it
    (src / "c.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "notes.txt").write_text("not a picture")  # ignored: not an image or video extension
    (src / "broken.mp4").write_bytes(b"\x00" * 1000)
    missing = tmp_path / "nope.png"
    result = run(src, missing, "--model", ckpt, "--out", tmp_path / "out")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert any(str(src / "c.jpg") in e and "not a readable image" in e for e in errors)
    assert any(str(src / "broken.mp4") in e for e in errors)
    assert any(str(missing) in e and "no such file" in e for e in errors)
    assert errors[-1].startswith("error: 3 of 5 sources failed")
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [r["source"] for r in recs] == [str(src / "a" / "blank.png"), str(src / "b" / "astronaut.jpg")]
    assert recs[0]["box"] is None and recs[0]["label"] is None and recs[0]["probs"] is None  # no face
    check_probs(recs[1])
    assert "ignored 1 files" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["predictions.jsonl", "predictions.meta.json"]  # no partial files


def test_wrong_model_fails_at_once(tmp_path):
    photo = write_astronaut(tmp_path / "a.png")
    for name, content in (("model.pt", b"hello"), ("model.onnx", b"not onnx")):
        bad = tmp_path / name
        bad.write_bytes(content)
        result = run(photo, "--model", bad, "--out", tmp_path / "out")
        assert result.exit_code == 1
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error: ") and str(bad) in line
    result = run(photo, "--model", tmp_path / "absent.pt", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "no such file" in result.output
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_options_checked(tmp_path, ckpt):
    photo = write_astronaut(tmp_path / "a.png")
    for args, text in ((("--detector", "mtcnn"), "--detector 'mtcnn'"), (("--vid-stride", "0"), "--vid-stride 0"),
                       (("--min-face", "10"), "--min-face 10")):
        result = run(photo, "--model", ckpt, "--out", tmp_path / "out", *args)
        assert result.exit_code == 1 and text in result.output, result.output


def test_detector_none_matches_eval_on_fer_val(tmp_path):
    """FER val files through `predict --detector none` = eval's probabilities for the same packed images."""
    found = fer_val(48)
    if found is None:
        pytest.skip(f"needs the FER2013 image folders at {FER} (test/<class>/PublicTest_*.jpg)")
    images, labels, files = found
    ckpt = make_checkpoint(tmp_path / "c.pt", img_size=64, channels=3)  # exercises the 48 -> 64 resize too
    want = eval_probs(ckpt, write_val_shards(tmp_path / "shards", images, labels, files))

    result = run(*files, "--model", ckpt, "--out", tmp_path / "out", "--detector", "none", "--batch-size", "20")
    assert result.exit_code == 0, result.output
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [r["source"] for r in recs] == [str(f) for f in files]
    assert all(r["box"] == [0, 0, 48, 48] for r in recs)
    got = np.array([[r["probs"][c] for c in FER2013_CLASSES] for r in recs])
    np.testing.assert_allclose(got, want, atol=2e-6)


def write_val_shards(shards: Path, images: np.ndarray, labels: np.ndarray, files: list[Path]) -> Path:
    """A packed data folder whose every split holds these faces (as `facesense pack` writes it)."""
    from pipeline.shards import FORMAT_VERSION, MANIFEST, split_entry, write_shard

    shards.mkdir()
    ids = [str(f) for f in files]
    splits = {s: split_entry(labels, FER2013_CLASSES, [write_shard(shards, s, 0, images, labels, ids, FER2013_CLASSES)])
              for s in ("train", "val", "test")}
    (shards / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "classes": list(FER2013_CLASSES),
                                               "splits": splits, "source": {"format": "test"}}))
    return shards


def eval_probs(ckpt: Path, shards: Path) -> np.ndarray:
    """Eval's probabilities on the val split: its model (load_eval_model), loader and predict_probs."""
    from facesense.core.checkpoint import load_eval_model
    from facesense.core.data import open_split
    from facesense.eval.metrics import predict_probs

    net = load_eval_model(ckpt)
    loader = open_split(shards, "val", net.cfg, torch.device("cpu"), train=False, batch_size=16)
    return predict_probs(net.model, loader)[0]


def test_bench_predict_json(tmp_path, ckpt):
    out = tmp_path / "predict.json"
    result = CliRunner().invoke(app, ["bench", "predict", "--model", str(ckpt), "--data", str(tmp_path / "none"),
                                      "--batch-size", "8", "--photos", "2", "--video-frames", "4", "--repeats", "1",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    modes = [(r["mode"], r["backend"]) for r in payload["results"]]
    assert modes == [(m, b) for m in ("classify", "photos", "video") for b in ("pytorch", "onnxruntime")] + \
        [("api-classify", "onnxruntime"), ("api-classify", "pytorch"), ("api-frames", "pytorch"), ("tracking", "pytorch")]
    rates = [r.get("faces_per_s") or r.get("photos_per_s") or r.get("frames_per_s")
             or r.get("frames_per_s_with_tracks") for r in payload["results"]]
    assert all(rate > 0 for rate in rates)
    assert payload["results"][2]["faces_found_per_photo"] > 0  # the portrait's face is found
    assert {"machine", "versions", "git_commit", "config"} <= set(payload)
