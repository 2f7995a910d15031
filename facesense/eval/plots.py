"""Figures (matplotlib, Agg backend: no display needed): curves, confusion matrix, ROC."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(history: list[dict], path: Path) -> None:
    """Train loss, train and val accuracy, val F1 / AUC and the learning rate, per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(epochs, [row["train_loss"] for row in history], marker="o")
    axes[0].set(title="train loss", xlabel="epoch")
    for key, label in (("train_accuracy", "train accuracy (augmented)"), ("val_accuracy", "val accuracy"),
                       ("val_f1_weighted", "val F1 (weighted)"), ("val_auc_macro_ovr", "val ROC AUC (macro OvR)")):
        values = [np.nan if row.get(key) is None else row[key] for row in history]  # older logs lack train acc
        axes[1].plot(epochs, values, marker="o", label=label, linestyle="--" if key.startswith("train") else "-")
    axes[1].set(title="accuracy: train vs validation (PublicTest)", xlabel="epoch", ylim=(0, 1))
    axes[1].legend()
    axes[2].plot(epochs, [row["lr"] for row in history], marker="o")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)


def confusion_heatmap(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    """Two panels: counts, and rows normalised to 1 (recall on the diagonal); class names on both axes."""
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    k = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(6 + 1.2 * k, 0.7 * k + 2.5))
    for ax, values, name, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set(xlabel="predicted", ylabel="true", title=f"{title}: {name}" if title else name)
        cut = values.max() / 2 if values.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > cut else "black")
    _save(fig, path)


def roc_curves(probs: np.ndarray, labels: np.ndarray, classes: list[str], aucs: dict, path: Path,
               title: str = "") -> None:
    """One-vs-rest ROC curve per class (classes absent from the labels are skipped)."""
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for c, name in enumerate(classes):
        if aucs.get(name) is None:
            continue
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[name]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title} ROC, one vs rest".strip(),
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
