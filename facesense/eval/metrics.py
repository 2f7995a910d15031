"""Evaluation arithmetic: class probabilities over a loader (with test-time augmentation) and metrics.

Metrics: accuracy, macro one-vs-rest ROC AUC, weighted F1, scikit-learn's per-class
precision / recall / F1, and the confusion matrix. A class absent from the labels has
no ROC curve: its AUC is null and the macro AUC averages the classes present (equal
to scikit-learn's `roc_auc_score(multi_class="ovr", average="macro")` when all are).
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from facesense.core.errors import FaceSenseError

TTA = ("none", "flip", "crops")


@torch.no_grad()
def predict_probs(model: nn.Module, loader, autocast=nullcontext(), tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
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
