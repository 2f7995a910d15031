"""--soft-labels: cross-entropy against the FER+ vote distribution; val and eval score the majority label."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from facesense.cli import app
from facesense.core.config import TrainConfig
from facesense.train.loop import hard_labels, make_criterion
from pipeline.classes import FERPLUS_CLASSES
from train_helpers import make_shards, train_args, wrap_train_batches

runner = CliRunner()
K = len(FERPLUS_CLASSES)


def invoke(args: list[str]):
    result = runner.invoke(app, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def manifest(counts: list[int]) -> dict:
    return {"classes": list(FERPLUS_CLASSES),
            "splits": {"train": {"class_counts": dict(zip(FERPLUS_CLASSES, counts))}}}


@pytest.mark.parametrize("smoothing, weights", [(0.0, "none"), (0.1, "none"), (0.1, "balanced")])
def test_loss_is_cross_entropy_against_the_normalised_votes(smoothing, weights):
    """Barsoum et al.'s 'crossentropy' mode: -sum_k w_k t_k log softmax(z)_k, t the votes over the K classes
    normalised to sum 1 (smoothed towards uniform by --label-smoothing), averaged over the batch."""
    gen = torch.Generator().manual_seed(0)
    votes = torch.randint(0, 6, (12, 10), generator=gen).float()
    votes[:, 0] += 1  # every image has a vote among the classes
    target = votes[:, :K] / votes[:, :K].sum(1, keepdim=True)
    logits = torch.randn(12, K, generator=gen)
    counts = [30, 20, 10, 5, 5, 3, 2, 1]
    cfg = TrainConfig(label_smoothing=smoothing, class_weights=weights)
    loss = make_criterion(cfg, manifest(counts), torch.device("cpu"))(logits, target)

    n = sum(counts)
    w = torch.tensor([n / (K * c) for c in counts]) if weights == "balanced" else torch.ones(K)
    t = target * (1 - smoothing) + smoothing / K
    want = -(w * t * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, want)
    # hard labels through the same criterion: the usual cross-entropy
    labels = target.argmax(1)
    hard = make_criterion(cfg, manifest(counts), torch.device("cpu"))(logits, labels)
    torch.testing.assert_close(hard, F.cross_entropy(logits, labels, weight=None if weights == "none" else w,
                                                     label_smoothing=smoothing))


def test_train_accuracy_counts_the_most_voted_class():
    target = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert hard_labels(target).tolist() == [1, 0]
    assert hard_labels(torch.tensor([2, 0])).tolist() == [2, 0]


@pytest.fixture(scope="module")
def ferplus(tmp_path_factory):
    """Tiny shards as `facesense pack --ferplus` keeps them: FER+'s 8 classes, 10 vote counts per image."""
    return make_shards(tmp_path_factory.mktemp("ferplus"), classes=FERPLUS_CLASSES, votes=True)


def test_soft_label_run_trains_on_distributions_and_scores_majority_labels(ferplus, tmp_path, monkeypatch):
    seen = []
    wrap_train_batches(monkeypatch, lambda loader, images, targets: seen.append(targets) or (images, targets))
    out = tmp_path / "run"
    result = invoke(train_args(ferplus, out, "--soft-labels", "--epochs", "1", "--max-steps", "3"))
    assert result.exit_code == 0, result.output
    assert len(seen) == 3
    for targets in seen:  # (B, K) float distributions, not labels
        assert targets.shape == (16, K) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
        assert ((targets > 0).sum(1) >= 1).all() and (targets.max(1).values >= 0.7 - 1e-6).all()
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(row["train_loss"]) and 0 <= row["train_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["config"]["soft_labels"] is True and last["classes"] == list(FERPLUS_CLASSES)

    # eval scores the majority label (the loader is never soft there), as the FER+ literature reports
    report_dir = tmp_path / "eval"
    result = invoke(["eval", str(out / "last.pt"), "--data", str(ferplus), "--out", str(report_dir),
                     "--device", "cpu", "--loader", "resident", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["count"] == 21 and sum(r["support"] for r in report["per_class"].values()) == 21


def test_soft_labels_need_votes_one_line(tmp_path):
    data = make_shards(tmp_path / "shards")  # no votes
    result = invoke(train_args(data, tmp_path / "run", "--soft-labels"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and "--ferplus" in lines[0], result.output
    assert not (tmp_path / "run").exists()
