"""Evaluation: predictions, metrics, and `facesense eval`'s report.

Metrics: accuracy, macro one-vs-rest ROC AUC, weighted F1, scikit-learn's per-class
precision / recall / F1, and the confusion matrix. A class absent from the labels has
no ROC curve: its AUC is null and the macro AUC averages the classes present (equal
to scikit-learn's `roc_auc_score(multi_class="ovr", average="macro")` when all are).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facesense.core.errors import FaceSenseError
from pipeline.shards import sha256_file

TTA = ("none", "flip", "crops")


@torch.no_grad()
def predict(model: nn.Module, loader, autocast=nullcontext(), tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) float64 and labels (N,) over one pass of an eval-mode loader.

    tta="flip" averages the probabilities of each image and its mirror image; tta="crops" averages
    ten views (the whole image and four corner crops zoomed 1.1x, each also mirrored: kernels.spec.
    crop_views), each made from the uint8 source by the loader's own affine sampler.
    Results stay on the device until the end: one host copy per pass, not per batch.
    """
    if tta not in TTA:
        raise FaceSenseError(f"--tta {tta!r}: expected one of {', '.join(TTA)}")
    if tta != "crops":
        return _predict_pass(model, loader, autocast, flip=tta == "flip")
    from kernels.spec import crop_views

    views = crop_views()
    try:
        passes = []
        for view in views:
            loader.set_view(view)
            passes.append(_predict_pass(model, loader, autocast, flip=False))
    except ValueError as exc:  # a loader that cannot make views
        raise FaceSenseError(f"--tta crops: {exc}") from exc
    finally:
        loader.set_view(None)
    labels = passes[0][1]
    assert all(np.array_equal(labels, y) for _, y in passes), "views must visit the images in the same order"
    return sum(p for p, _ in passes) / len(passes), labels


def _predict_pass(model: nn.Module, loader, autocast, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        with autocast:
            p = model(images).float().softmax(1)
            if flip:
                p = (p + model(images.flip(3)).float().softmax(1)) / 2
        probs.append(p)
        labels.append(y)
    model.train(was_training)
    if not probs:
        raise FaceSenseError("the split has no images to evaluate")
    return torch.cat(probs).double().cpu().numpy(), torch.cat(labels).cpu().numpy()


def compute_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import classification_report, confusion_matrix, f1_score, roc_auc_score

    k = len(classes)
    broken = int((~np.isfinite(probs)).any(1).sum())
    if broken:  # scikit-learn would fail with a traceback on them
        raise FaceSenseError(f"the model's outputs are NaN or infinite for {broken} of {len(probs)} images: "
                             f"its weights are unusable (a diverged run); evaluate an earlier checkpoint")
    preds = probs.argmax(1)
    aucs = {}
    for c, name in enumerate(classes):
        positive = labels == c
        aucs[name] = float(roc_auc_score(positive, probs[:, c])) if 0 < positive.sum() < len(labels) else None
    present = [a for a in aucs.values() if a is not None]
    report = classification_report(labels, preds, labels=list(range(k)), target_names=classes,
                                   output_dict=True, zero_division=0)
    return {
        "accuracy": float((preds == labels).mean()),
        "auc_macro_ovr": float(np.mean(present)) if present else None,
        "f1_weighted": float(f1_score(labels, preds, labels=list(range(k)), average="weighted", zero_division=0)),
        "f1_macro": float(report["macro avg"]["f1-score"]),
        "count": int(len(labels)),
        "classes": list(classes),
        "per_class": {name: {"precision": report[name]["precision"], "recall": report[name]["recall"],
                             "f1": report[name]["f1-score"], "support": int(report[name]["support"]),
                             "auc": aucs[name]} for name in classes},
        "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(k))).tolist(),
    }


def print_table(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("class", "precision", "recall", "F1", "AUC", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in metrics["per_class"].items():
        auc = "-" if row["auc"] is None else f"{row['auc']:.3f}"
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", auc,
                      str(row["support"]))
    auc = "-" if metrics["auc_macro_ovr"] is None else f"{metrics['auc_macro_ovr']:.4f}"
    console = Console()
    console.print(table)
    console.print(f"accuracy {metrics['accuracy']:.4f}   macro OvR ROC AUC {auc}   "
                  f"weighted F1 {metrics['f1_weighted']:.4f}   ({metrics['count']} images)")


def default_out(checkpoint: Path, split: str) -> Path:
    """eval-<name>-<split>/ beside the checkpoint: never the run's own directory, where another report may live."""
    return Path(checkpoint).parent / f"eval-{Path(checkpoint).stem}-{split}"


def check_out(out: Path, checkpoint: Path, checkpoint_sha: str, overwrite: bool) -> None:
    """Refuse, before evaluating, an --out that is a file or holds the report of another checkpoint."""
    if out.exists() and not out.is_dir():
        raise FaceSenseError(f"--out {out}: is a file, not a directory; choose another --out")
    try:
        previous = json.loads((out / "report.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no report there (or not one of ours: it is replaced like any output file)
    same = (previous.get("sha256") == checkpoint_sha
            or previous.get("path") == str(Path(checkpoint).resolve()))  # the same run's retrained best.pt
    if not same and not overwrite:
        raise FaceSenseError(f"{out / 'report.json'} is the report of another checkpoint ({previous.get('path')}); "
                             f"choose another --out, or pass --overwrite to replace it")


def evaluate_checkpoint(checkpoint: Path, data: Path, split: str = "test", out: Path | None = None,
                        tta: str = "none", batch_size: int = 512, loader: str = "auto", workers: int = 2,
                        device: str = "auto", overwrite: bool = False) -> dict:
    """Evaluate a checkpoint on one split; write report.json and the figures into `out`."""
    from facesense.eval import plots
    from facesense.core.datacheck import check_shards
    from facesense.core.checkpoint import eval_weights, load_checkpoint
    from facesense.core.config import config_from_dict
    from facesense.core.data import data_identity, open_split, read_manifest
    from facesense.core.model import create_model
    from facesense.core.runtime import setup
    from pipeline.classes import SPLITS

    if split not in SPLITS:
        raise FaceSenseError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if tta not in TTA:
        raise FaceSenseError(f"--tta {tta!r}: expected one of {', '.join(TTA)}")
    if batch_size < 1:
        raise FaceSenseError(f"--batch-size {batch_size}: must be at least 1")
    ckpt = load_checkpoint(checkpoint)
    checkpoint_sha = sha256_file(Path(checkpoint))
    out = Path(out) if out is not None else default_out(checkpoint, split)
    check_out(out, checkpoint, checkpoint_sha, overwrite)
    cfg = config_from_dict(ckpt["config"], str(checkpoint))
    cfg.loader, cfg.workers = loader, workers
    manifest = read_manifest(data)
    classes = list(manifest["classes"])
    if classes != list(ckpt["classes"]):
        raise FaceSenseError(f"{checkpoint} was trained on classes {ckpt['classes']}, {data} has {classes}")
    if manifest["splits"][split]["count"] == 0:
        raise FaceSenseError(f"{data}: the {split} split is empty; nothing to evaluate")
    check_shards(data, manifest, split)  # the report names these shards: they must be the ones packed

    rt = setup(device, deterministic=False)
    weights, which = eval_weights(ckpt)
    model = create_model(cfg.model, cfg.channels, len(classes))
    model.load_state_dict(weights)
    model.to(rt.device, memory_format=torch.channels_last)
    batches = open_split(data, split, cfg, rt.device, train=False, batch_size=batch_size)
    probs, labels = predict(model, batches, tta=tta)
    metrics = compute_metrics(probs, labels, classes)

    out.mkdir(parents=True, exist_ok=True)
    report = {**metrics, "split": split, "tta": tta,
              "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": checkpoint_sha,
                             "model": cfg.model, "weights": which, "epoch": ckpt["epoch"], "step": ckpt["step"],
                             "best_val_accuracy": ckpt.get("best_accuracy")},
              "data": data_identity(data, manifest, split),
              "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__}}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    title = f"{cfg.model} on {split}"
    plots.confusion_heatmap(np.array(metrics["confusion_matrix"]), classes, out / "confusion_matrix_heatmap.png",
                            title)
    plots.roc_curves(probs, labels, classes, {n: r["auc"] for n, r in metrics["per_class"].items()},
                     out / "roc_curves.png", title)
    print_table(metrics, f"{Path(checkpoint).name} on {split} ({which} weights, tta {tta})")
    return report
