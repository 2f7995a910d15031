"""Test-time augmentation: the views are what they claim, and averaging them keeps a constant model's answer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from facesense.cli import app
from facesense.eval.metrics import predict_probs as predict
from kernels.spec import View, crop_views
from pipeline.loaders import LoaderConfig, make_loader
from train_helpers import make_shards, train_args, write_shards

RAMP = np.tile(np.arange(48, dtype=np.uint8) * 5, (48, 1))  # value = 5 * x: bilinear sampling is exact on it


@pytest.fixture(scope="module")
def ramp_shards(tmp_path_factory):
    n = {"train": 8, "val": 6, "test": 0}
    splits = {s: (np.repeat(RAMP[None], k, 0), np.arange(k) % 7, [f"{s}/{i}" for i in range(k)]) for s, k in n.items()}
    return write_shards(tmp_path_factory.mktemp("ramp"), splits, ("angry", "disgust", "fear", "happy", "sad",
                                                                  "surprise", "neutral"), 4)


def eval_loader(data, kind="resident"):
    cfg = LoaderConfig(kind=kind, batch_size=4, train=False, mean=(0.0,), std=(1.0,), compile_cpu=False)
    return make_loader(data, "val", cfg, "cpu")


def first_image(loader) -> torch.Tensor:
    return (next(iter(loader))[0][0, 0] * 255).double()  # back to 0..255 (mean 0, std 1 above)


def test_crop_views_are_ten_with_the_plain_image_and_mirrors():
    views = crop_views()
    assert len(views) == 10 and len(set(views)) == 10 and views[0] == View()
    assert sorted((v.scale, v.tx, v.ty) for v in views if v.flip) == sorted((v.scale, v.tx, v.ty) for v in views
                                                                            if not v.flip)


def test_views_change_the_input_as_intended(ramp_shards):
    loader = eval_loader(ramp_shards)
    plain = first_image(loader)
    assert torch.allclose(plain, torch.tensor(RAMP, dtype=torch.float64), atol=1e-3)
    loader.set_view(View(flip=True))
    assert torch.allclose(first_image(loader), plain.flip(1), atol=1e-3)  # mirrored exactly
    # Bottom-right corner crop zoomed 1.1x: output pixel k shows source x = ((u + 1) * 48 - 1) / 2 with
    # u = (u_out + 0.1) / 1.1, so the crop spans the right 1/1.1 of the face and ends at its right edge.
    loader.set_view(View(1.1, -0.1, -0.1))
    got = first_image(loader)
    u_out = (2 * torch.arange(48, dtype=torch.float64) + 1) / 48 - 1
    x_src = (((u_out + 0.1) / 1.1 + 1) * 48 - 1) / 2
    want = 5 * x_src.clamp(0, 47)
    assert torch.allclose(got, want.expand(48, 48), atol=0.05)
    assert got[0, 0] > plain[0, 0] + 15  # the crop starts ~4 px in from the left edge
    loader.set_view(None)
    assert torch.equal(first_image(loader), plain)


class Constant(nn.Module):
    """Ignores its input: the same logits for every image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


@pytest.mark.parametrize("tta", ["none", "flip", "crops"])
def test_tta_on_a_constant_model_returns_its_prediction(ramp_shards, tta):
    logits = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.25]
    probs, labels = predict(Constant(logits), eval_loader(ramp_shards), tta=tta)
    assert probs.shape == (6, 7) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert np.allclose(probs, torch.tensor(logits).softmax(0).double().numpy(), atol=1e-6)


def test_crops_need_a_loader_that_makes_views(ramp_shards):
    from facesense.core.errors import FaceSenseError

    loader = make_loader(ramp_shards, "val", LoaderConfig(kind="dataloader", batch_size=4, train=False,
                                                          workers=0), "cpu")
    with pytest.raises(FaceSenseError, match="--tta crops: .*resident or dali"):
        predict(Constant([0.0] * 7), loader, tta="crops")


def test_eval_cli_records_crops_tta(tmp_path):
    data = make_shards(tmp_path / "shards")
    run = tmp_path / "run"
    assert CliRunner().invoke(app, train_args(data, run, "--epochs", "1")).exit_code == 0
    result = CliRunner().invoke(app, ["eval", str(run / "best.pt"), "--data", str(data), "--split", "val",
                                      "--tta", "crops", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["tta"] == "crops" and report["count"] == 28
