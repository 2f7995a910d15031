"""`from facesense import Recognizer`: the README's example, the CLI's parity, threads, one-line errors, meta."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facesense.cli import app
from facesense.core.errors import FaceSenseError
from pipeline.classes import FER2013_CLASSES
from predict_helpers import astronaut_bgr, make_checkpoint, read_jsonl, write_astronaut, write_video
from train_helpers import ROOT

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def rec(ckpt):
    from facesense import Recognizer

    return Recognizer(ckpt, device="cpu")


def readme_example() -> str:
    """The python block of README.md's "Python API" subsection, as a reader copies it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, ckpt, monkeypatch, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "best.pt").write_bytes(ckpt.read_bytes())
    write_astronaut(tmp_path / "photo.jpg")
    write_video(tmp_path / "clip.mp4", frames=6)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert str(list(FER2013_CLASSES)) in out
    assert re.search(r"^\[\d+, \d+, \d+, \d+\] \w+ 0\.\d+$", out, re.M), out  # a face: box, label, probability
    assert "(4, 7)" in out
    assert re.search(r"^4 0\.4 1 \w+$", out, re.M), out  # video frame 4 at 0.4 s, on track 1


def test_import_facesense_stays_cheap():
    code = "import sys, facesense; print('torch' in sys.modules, 'cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_api_gives_what_predict_writes(tmp_path, ckpt, rec):
    photo = write_astronaut(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["predict", str(photo), "--model", str(ckpt), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (line,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    from PIL import Image

    for picture in (str(photo), astronaut_bgr(), Image.open(photo)):
        (face,) = rec(picture)
        assert face.box == line["box"] and face.label == line["label"]
        assert face.probs == pytest.approx(line["probs"], abs=1e-6)
    assert rec.classes == list(FER2013_CLASSES) and rec.input_size == 48 and rec.channels == 1


def test_classify_batches_crops_of_any_size(rec):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (300, 48, 48), dtype=np.uint8)
    probs = rec.classify(crops)
    assert probs.shape == (300, 7) and np.allclose(probs.sum(1), 1)
    assert np.allclose(rec.classify(crops[:5]), probs[:5], atol=1e-6)  # a batch boundary changes nothing
    big = [cv2.resize(c, (96, 96), interpolation=cv2.INTER_LINEAR) for c in crops[:3]]
    bgr = [cv2.cvtColor(c, cv2.COLOR_GRAY2BGR) for c in crops[:3]]
    assert np.allclose(rec.classify(bgr), probs[:3], atol=1e-6)
    assert rec.classify(big).shape == (3, 7)
    assert rec.classify([]).shape == (0, 7)


def test_concurrent_calls_from_threads_give_the_serial_results(rec):
    image = astronaut_bgr()
    pictures = [np.roll(image, 6 * k, axis=1) for k in range(8)]
    serial = [rec(p) for p in pictures]
    assert all(len(faces) == 1 for faces in serial)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            threaded = list(pool.map(rec, pictures))
            for got, want in zip(threaded, serial):
                assert [f.box for f in got] == [f.box for f in want]
                for g, w in zip(got, want):
                    assert g.probs == pytest.approx(w.probs, abs=1e-6)


@pytest.mark.parametrize("bad, text", [
    (np.zeros((64, 64), np.float64), "dtype float64"),
    (np.zeros((64, 64, 2), np.uint8), "shape (64, 64, 2)"),
    (np.zeros((0, 64), np.uint8), "shape (0, 64)"),
    ([1, 2, 3], "a list; expected a path"),
])
def test_wrong_array_is_one_line(rec, bad, text):
    with pytest.raises(FaceSenseError) as err:
        rec(bad)
    assert text in str(err.value) and "\n" not in str(err.value)


def test_unreadable_path_and_wrong_model_are_one_line(tmp_path, rec):
    from facesense import Recognizer

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a picture")
    for path, text in ((junk, "not a readable image"), (tmp_path / "absent.jpg", "cannot read")):
        with pytest.raises(FaceSenseError, match=re.escape(str(path))) as err:
            rec(path)
        assert text in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FaceSenseError, match="no such file"):
        Recognizer(tmp_path / "absent.pt")
    with pytest.raises(FaceSenseError, match="expected a FaceSense checkpoint"):
        Recognizer(junk)
    with pytest.raises(FaceSenseError, match="crops: shape"):
        rec.classify(np.zeros((2, 3, 4, 5, 6), np.uint8))


def test_predictions_meta_describes_the_run(tmp_path, ckpt):
    import facesense
    from facesense.infer.recognizer import Face
    from pipeline.shards import sha256_file

    photo = write_astronaut(tmp_path / "a.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(photo), "--model", str(ckpt), "--out", str(out),
                                      "--smooth", "3", "--min-face", "40"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "predictions.meta.json").read_text())
    assert meta["schema_version"] == Face.schema_version
    assert meta["facesense_version"] == facesense.__version__
    assert meta["model"]["sha256"] == sha256_file(ckpt) and meta["model"]["classes"] == list(FER2013_CLASSES)
    assert meta["model"]["input_size"] == 48 and meta["model"]["channels"] == 1
    assert meta["detector"]["name"] == "haar" and meta["detector"]["min_face"] == 40
    assert meta["options"]["smooth"] == 3 and meta["options"]["batch_size"] == 64
    assert meta["sources"] == [str(photo)]
    # an earlier run's meta is part of what --out protects
    again = CliRunner().invoke(app, ["predict", str(photo), "--model", str(ckpt), "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
