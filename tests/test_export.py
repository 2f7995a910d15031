"""facesense export: ONNX and TorchScript equal the PyTorch model on real faces; predict with .onnx = with .pt."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facesense.cli import app
from facesense.infer.faces import Preprocess, model_input
from pipeline.classes import FER2013_CLASSES
from predict_helpers import fer_val, make_checkpoint, read_jsonl, torch_logits, write_astronaut

ort = pytest.importorskip("onnxruntime")


def faces(n: int) -> np.ndarray:
    """Real FER2013 val faces from ../shared/fer2013, else made-up ones (the parity check still holds)."""
    found = fer_val(n)
    if found is not None:
        return found[0]
    return np.random.default_rng(0).integers(0, 256, (n, 48, 48), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint whose EMA differs from its raw weights, exported to both formats."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(tmp / "c.pt", img_size=56, channels=3, ema=True)
    runner = CliRunner()
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.ts")):
        result = runner.invoke(app, ["export", str(ckpt), "--format", fmt, "--out", str(tmp / name)])
        assert result.exit_code == 0, result.output
    return ckpt, tmp / "m.onnx", tmp / "m.ts"


def test_onnx_equals_pytorch_with_ema_weights_and_metadata(exported):
    ckpt, onnx_path, _ = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["facesense"])
    assert meta["classes"] == list(FER2013_CLASSES) and meta["weights"] == "ema"
    assert (meta["img_size"], meta["channels"], meta["norm_mean"], meta["norm_std"]) == (56, 3, 0.45, 0.3)
    x = model_input(faces(37), Preprocess(56, 3, 0.45, 0.3))
    for batch in (x[:1], x):  # dynamic batch size
        got = session.run(None, {session.get_inputs()[0].name: batch.contiguous().numpy()})[0]
        want = torch_logits(ckpt, batch)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    # the EMA, not the raw weights, went into the file
    assert (torch_logits(ckpt, x, "model") - torch_logits(ckpt, x)).abs().max() > 1e-2


def test_torchscript_equals_pytorch(exported):
    ckpt, _, ts_path = exported
    extra = {"facesense.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["facesense.json"])["img_size"] == 56
    x = model_input(faces(21), Preprocess(56, 3, 0.45, 0.3))
    with torch.no_grad():
        for batch in (x[:3], x):
            torch.testing.assert_close(module(batch), torch_logits(ckpt, batch), atol=1e-4, rtol=0)


def test_predict_onnx_gives_the_same_labels_as_pt(exported, tmp_path):
    ckpt, onnx_path, ts_path = exported
    srcs = [str(write_astronaut(tmp_path / "astronaut.png"))]
    found = fer_val(30)
    args = ["--detector", "none"] if found is not None else []
    if found is not None:
        srcs = [str(f) for f in found[2]]
    runs = {}
    for name, model in (("pt", ckpt), ("onnx", onnx_path)):
        result = CliRunner().invoke(app, ["predict", *srcs, "--model", str(model), "--out", str(tmp_path / name),
                                          *args])
        assert result.exit_code == 0, result.output
        runs[name] = read_jsonl(tmp_path / name / "predictions.jsonl")
    assert [r["label"] for r in runs["pt"]] == [r["label"] for r in runs["onnx"]]
    for a, b in zip(runs["pt"], runs["onnx"]):
        assert a["box"] == b["box"]
        np.testing.assert_allclose(list(a["probs"].values()), list(b["probs"].values()), atol=1e-4)
    # a TorchScript file is not a --model: one clear line saying what to pass instead
    result = CliRunner().invoke(app, ["predict", *srcs, "--model", str(ts_path), "--out", str(tmp_path / "ts")])
    assert result.exit_code == 1 and "TorchScript export" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_export_errors(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "--format 'tflite'" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "none.pt"), "--format", "onnx", "--out",
                                 str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "no such checkpoint" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # nothing half-written


def test_onnx_without_metadata_is_refused(tmp_path):
    import onnx

    ckpt = make_checkpoint(tmp_path / "c.pt")
    assert CliRunner().invoke(app, ["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
                              ).exit_code == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    photo = write_astronaut(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["predict", str(photo), "--model", str(tmp_path / "plain.onnx"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no FaceSense metadata" in result.output
