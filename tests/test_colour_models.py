"""Input size and channels come from the data and the checkpoint: colour models, other sizes, old files."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facesense.cli import app
from facesense.core.checkpoint import checkpoint_source, load_eval_model
from facesense.core.config import TrainConfig, for_data, source_record
from facesense.core.errors import FaceSenseError
from facesense.infer.faces import Preprocess, find_faces, square_crop
from predict_helpers import make_checkpoint, read_jsonl, write_astronaut
from train_helpers import ROOT, make_shards, train_args

runner = CliRunner()


def invoke(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def manifest(channels=1, shape=(48, 48), votes=False) -> dict:
    return {"votes": votes, "splits": {"train": {"channels": channels, "image_shape": list(shape) if shape else None}}}


# ----------------------------------------------------------------------------- the config resolved from the data

@pytest.mark.parametrize("data, want", [
    (manifest(1, (48, 48)), (1, 48)),  # FER2013
    (manifest(3, (100, 100)), (3, 100)),  # RAF-DB aligned
    (manifest(3, (32, 32)), (3, 32)),
])
def test_channels_and_img_size_default_to_the_data(data, want):
    cfg = for_data(TrainConfig(), data)
    assert (cfg.channels, cfg.img_size) == want
    assert TrainConfig().channels is None and TrainConfig().img_size is None  # "from the data" until resolved
    # given options win; gray data may feed a 3-channel stem (replicated)
    cfg = for_data(TrainConfig(channels=3, img_size=64), data)
    assert (cfg.channels, cfg.img_size) == (3, 64)


@pytest.mark.parametrize("data, options, message", [
    (manifest(1, (40, 32)), {}, "40x32 (height x width)"),
    (manifest(3, None), {}, "of differing sizes"),
    (manifest(3, (100, 100)), {"channels": 1}, "pack the source with --channels 1"),
    (manifest(1, (48, 48)), {"soft_labels": True}, "--ferplus"),
])
def test_what_the_data_cannot_give_is_one_line(data, options, message):
    with pytest.raises(FaceSenseError, match=re.escape(message)) as err:
        for_data(TrainConfig(data="my/shards", **options), data)
    assert "\n" not in str(err.value) and "my/shards" in str(err.value)
    if not options:
        assert "--img-size" in str(err.value)
        assert for_data(TrainConfig(img_size=36), data).img_size == 36  # and --img-size is the way out


def test_source_record_is_the_train_split_or_the_decode_size():
    assert source_record(manifest(3, (100, 100)), 112) == {"image_shape": [100, 100], "channels": 3}
    assert source_record(manifest(3, None), 112) == {"image_shape": [112, 112], "channels": 3}


def test_loader_choices_and_new_options():
    assert TrainConfig(loader="stream").loader == "stream"
    cfg = TrainConfig(aug_saturation=0.3, resident_budget_gb=2.5)
    assert cfg.aug().saturation == 0.3 and cfg.resident_budget_gb == 2.5
    with pytest.raises(FaceSenseError, match="--resident-budget-gb"):
        TrainConfig(resident_budget_gb=-1)


# ----------------------------------------------------------------------------- a colour model, end to end

@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A model trained a few steps on 32x32 RGB shards (no --channels, no --img-size: the data's)."""
    tmp = tmp_path_factory.mktemp("colour")
    data = make_shards(tmp / "shards", shape=(32, 32), channels=3)
    out = tmp / "run"
    result = invoke(train_args(data, out, "--epochs", "1", "--max-steps", "2"))
    assert result.exit_code == 0, result.output
    return data, out


def test_colour_data_trains_a_colour_model_and_records_its_source(colour_run):
    data, out = colour_run
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (last["config"]["channels"], last["config"]["img_size"]) == (3, 32)  # resolved: real numbers
    assert last["source"] == {"image_shape": [32, 32], "channels": 3}
    assert last["model"]["conv_stem.weight"].shape[1] == 3
    # resuming with the same command compares the resolved configs: it is the same run
    again = invoke(train_args(data, out, "--epochs", "1", "--max-steps", "3", "--resume"))
    assert again.exit_code == 0, again.output


def test_eval_takes_the_checkpoints_input_and_refuses_other_channels(colour_run, tmp_path):
    data, out = colour_run
    result = invoke(["eval", out / "best.pt", "--data", data, "--out", tmp_path / "eval", "--device", "cpu",
                     "--loader", "resident", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["checkpoint"]["source"] == {"image_shape": [32, 32], "channels": 3} and report["count"] == 21
    gray = make_shards(tmp_path / "gray", shape=(32, 32))
    refused = invoke(["eval", out / "best.pt", "--data", gray, "--out", tmp_path / "eval2", "--device", "cpu"])
    assert refused.exit_code == 1 and "--channels 3" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_non_square_data_needs_img_size_and_records_its_shape(tmp_path):
    data = make_shards(tmp_path / "shards", shape=(40, 32))
    refused = invoke(train_args(data, tmp_path / "run", "--max-steps", "1"))
    assert refused.exit_code == 1 and "--img-size" in refused.output and "40x32" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    result = invoke(train_args(data, tmp_path / "run", "--epochs", "1", "--max-steps", "1", "--img-size", "32"))
    assert result.exit_code == 0, result.output
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert last["source"] == {"image_shape": [40, 32], "channels": 1} and last["config"]["img_size"] == 32


def test_colour_model_exports_and_predicts_on_colour_crops(colour_run, tmp_path):
    from facesense import Recognizer

    _, out = colour_run
    onnx_path = tmp_path / "m.onnx"
    result = invoke(["export", out / "best.pt", "--format", "onnx", "--out", onnx_path])
    assert result.exit_code == 0, result.output
    assert "from 32x32 RGB faces" in result.output
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["facesense"])
    assert (meta["version"], meta["source_shape"], meta["source_channels"]) == (2, [32, 32], 3)
    assert "face_size" not in meta

    picture = np.zeros((64, 80, 3), np.uint8)
    picture[..., 0], picture[..., 1], picture[..., 2] = 200, 90, 10  # BGR: strongly blue
    probs = {}
    for path in (out / "best.pt", onnx_path):
        rec = Recognizer(path, device="cpu", detector="none")
        assert rec.crop_shape == (32, 32, 3) and rec.channels == 3 and rec.input_size == 32
        boxes, crops = rec.detect(picture)
        assert boxes == [(0, 0, 80, 64)] and crops.shape == (1, 32, 32, 3) and crops.dtype == np.uint8
        assert crops[0, 0, 0].tolist() == [10, 90, 200]  # RGB, as colour shards hold faces
        probs[path.suffix] = rec.classify(crops)
        # pictures (BGR) are cropped the same way: the same probabilities
        np.testing.assert_allclose(rec.classify([picture]), probs[path.suffix], atol=1e-6)
    np.testing.assert_allclose(probs[".pt"], probs[".onnx"], atol=1e-4)

    photo = write_astronaut(tmp_path / "a.png")
    result = invoke(["predict", photo, "--model", out / "best.pt", "--out", tmp_path / "pred", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (line,) = read_jsonl(tmp_path / "pred" / "predictions.jsonl")
    assert set(line) == {"source", "frame", "box", "label", "probs"} and len(line["probs"]) == 7
    meta = json.loads((tmp_path / "pred" / "predictions.meta.json").read_text())
    assert (meta["model"]["source_shape"], meta["model"]["source_channels"]) == ([32, 32], 3)


def test_haar_crops_follow_the_source_shape_and_channels():
    from facesense.infer.faces import HaarDetector
    from predict_helpers import astronaut_bgr

    picture = astronaut_bgr()
    boxes, gray = find_faces(picture, HaarDetector(48))
    assert len(boxes) == 1 and gray.shape == (1, 48, 48)
    _, colour = find_faces(picture, HaarDetector(48), shape=(100, 100), channels=3)
    assert colour.shape == (1, 100, 100, 3)
    _, tall = find_faces(picture, HaarDetector(48), shape=(40, 32), channels=3)
    assert tall.shape == (1, 40, 32, 3)
    assert find_faces(np.full((60, 60, 3), 128, np.uint8), HaarDetector(48), shape=(40, 32), channels=3)[1].shape \
        == (0, 40, 32, 3)
    # a crop of the source's aspect holds the detector's square box whole
    image = np.arange(200 * 200, dtype=np.uint32).reshape(200, 200).astype(np.uint8)
    assert square_crop(image, (50, 50, 100, 100), 0.0).shape == (50, 50)
    assert square_crop(image, (50, 50, 100, 100), 0.0, aspect=32 / 40).shape == (62, 50)
    assert square_crop(image, (50, 50, 100, 100), 0.0, aspect=2.0).shape == (50, 100)


# ----------------------------------------------------------------------------- old files still work

def test_checkpoints_before_source_mean_48_gray(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")  # no "source": as every checkpoint before version 3
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    payload["version"] = 2
    torch.save(payload, tmp_path / "v2.pt")
    net = load_eval_model(tmp_path / "v2.pt")
    assert net.source == {"image_shape": [48, 48], "channels": 1} == checkpoint_source(payload)
    shipped = ROOT / "model" / "best.pt"
    if shipped.is_file():
        from facesense import Recognizer

        rec = Recognizer(shipped, device="cpu")
        assert rec.crop_shape == (48, 48) and rec.classify(np.zeros((2, 48, 48), np.uint8)).shape[0] == 2


def test_version_1_export_metadata_still_reads(tmp_path):
    from facesense.infer.classifier import OnnxClassifier
    from facesense.infer.export import read_metadata

    pytest.importorskip("onnxruntime")
    import onnx

    ckpt = make_checkpoint(tmp_path / "c.pt")
    assert invoke(["export", ckpt, "--format", "onnx", "--out", tmp_path / "m.onnx"]).exit_code == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = json.loads(proto.metadata_props[0].value)
    old = {k: v for k, v in meta.items() if k not in ("source_shape", "source_channels")}
    old.update(version=1, face_size=48)  # what FaceSense wrote before
    proto.metadata_props[0].value = json.dumps(old)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    classifier = OnnxClassifier(tmp_path / "old.onnx", "cpu")
    assert classifier.pre == Preprocess(48, 1, 0.45, 0.3, (48, 48), 1)
    assert classifier.probs(np.zeros((3, 48, 48), np.uint8)).shape == (3, 7)
    with pytest.raises(FaceSenseError, match="reads facesense-export 1 and 2"):
        read_metadata(json.dumps({**old, "version": 3}), tmp_path / "x.onnx")
