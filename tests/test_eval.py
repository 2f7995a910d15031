"""`facesense eval`: report.json, figures, TTA, metrics against scikit-learn, safe loading, clear errors."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facesense.cli import app
from facesense.eval.metrics import compute_metrics
from train_helpers import make_shards, train_args

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run: (shards, run dir)."""
    root = tmp_path_factory.mktemp("eval")
    data = make_shards(root / "shards")
    result = runner.invoke(app, train_args(data, root / "run", "--epochs", "1", "--ema"))
    assert result.exit_code == 0, result.output
    return data, root / "run"


def evaluate(*args):
    result = runner.invoke(app, ["eval", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_eval_writes_report_and_figures(trained, tmp_path):
    data, run = trained
    out = tmp_path / "report"
    result = evaluate(run / "best.pt", "--data", data, "--out", out, "--device", "cpu", "--loader", "resident")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "neutral" in result.output  # the printed table
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy", "auc_macro_ovr", "f1_weighted", "per_class", "confusion_matrix", "checkpoint", "data"):
        assert key in report, key
    assert report["split"] == "test" and report["tta"] == "none"
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == report["count"] == 21
    assert report["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert set(report["per_class"]) == set(report["classes"])
    assert {"precision", "recall", "f1", "support", "auc"} <= set(report["per_class"]["happy"])
    assert report["checkpoint"]["weights"] == "ema" and len(report["checkpoint"]["sha256"]) == 64
    assert report["data"]["split"] == "test" and report["data"]["shards"][0]["sha256"]
    for name in ("confusion_matrix_heatmap.png", "roc_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_eval_val_split_with_flip_tta(trained, tmp_path):
    data, run = trained
    result = evaluate(run / "last.pt", "--data", data, "--split", "val", "--tta", "flip", "--out", tmp_path,
                      "--device", "cpu", "--batch-size", "5")  # 28 images: a partial last batch
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "val" and report["tta"] == "flip" and report["count"] == 28


def test_eval_val_matches_training_selection(trained, tmp_path):
    data, run = trained
    assert evaluate(run / "best.pt", "--data", data, "--split", "val", "--out", tmp_path,
                    "--device", "cpu").exit_code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert report["accuracy"] == pytest.approx(row["val_accuracy"])
    assert report["f1_weighted"] == pytest.approx(row["val_f1_weighted"])


def test_empty_split_is_a_clear_error(tmp_path, trained):
    _, run = trained
    data = make_shards(tmp_path / "shards", counts={"train": 32, "val": 14, "test": 0})
    result = evaluate(run / "best.pt", "--data", data, "--out", tmp_path / "r", "--device", "cpu")
    assert result.exit_code == 1 and "test split is empty" in result.output


def test_other_classes_and_bad_split_are_clear_errors(tmp_path, trained):
    _, run = trained
    data = make_shards(tmp_path / "shards", classes=("a", "b", "c"))
    result = evaluate(run / "best.pt", "--data", data, "--out", tmp_path / "r")
    assert result.exit_code == 1 and "classes" in result.output
    result = evaluate(run / "best.pt", "--data", data, "--split", "train2", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "--split 'train2'" in result.output


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_loading_a_checkpoint_cannot_run_code(tmp_path, trained, monkeypatch):
    data, _ = trained
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "facesense-checkpoint", "version": 1, "model": _RunsCode()}, evil)
    result = evaluate(evil, "--data", data, "--out", tmp_path / "r")
    assert result.exit_code == 1 and "not a loadable FaceSense checkpoint" in result.output
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"hello": 1}, protocol=2))
    result = evaluate(plain, "--data", data, "--out", tmp_path / "r")
    assert result.exit_code == 1 and "FaceSense checkpoint" in result.output


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(probs, labels, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert m["auc_macro_ovr"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(labels, probs.argmax(1), average="weighted"))
    assert sum(r["support"] for r in m["per_class"].values()) == 200


def test_metrics_with_a_class_absent_from_the_labels():
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    m = compute_metrics(probs, labels, ["x", "y", "z"])
    assert m["per_class"]["z"]["auc"] is None and m["per_class"]["z"]["support"] == 0
    assert m["auc_macro_ovr"] == pytest.approx(1.0) and m["accuracy"] == 1.0
    assert np.array(m["confusion_matrix"]).shape == (3, 3)
