"""`facesense eval`: a checkpoint on one split -> report.json, confusion matrix and ROC figures, a table."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from facesense.core.errors import FaceSenseError
from facesense.core.files import require_dir, write_bytes
from facesense.eval import metrics as metrics_module  # module attribute: tests swap predict_probs
from facesense.eval.metrics import TTA, compute_metrics
from pipeline.shards import sha256_file

CHANNEL_NAMES = {1: "gray (1-channel)", 3: "colour (RGB)"}


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
    require_dir(out)
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
    from facesense.core.checkpoint import load_eval_model
    from facesense.core.data import check_shards, data_identity, open_split, read_manifest
    from facesense.core.runtime import setup
    from pipeline.classes import SPLITS

    if split not in SPLITS:
        raise FaceSenseError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if tta not in TTA:
        raise FaceSenseError(f"--tta {tta!r}: expected one of {', '.join(TTA)}")
    if batch_size < 1:
        raise FaceSenseError(f"--batch-size {batch_size}: must be at least 1")
    rt = setup(device, deterministic=False)
    net = load_eval_model(checkpoint, rt.device)
    checkpoint_sha = sha256_file(Path(checkpoint))
    out = Path(out) if out is not None else default_out(checkpoint, split)
    check_out(out, checkpoint, checkpoint_sha, overwrite)
    manifest = read_manifest(data)
    classes = list(manifest["classes"])
    if classes != list(net.ckpt["classes"]):
        raise FaceSenseError(f"{checkpoint} was trained on classes {net.ckpt['classes']}, {data} has {classes}")
    if manifest["splits"][split]["count"] == 0:
        raise FaceSenseError(f"{data}: the {split} split is empty; nothing to evaluate")
    check_shards(data, manifest, split)  # the report names these shards: they must be the ones packed
    have, want = manifest["splits"][split].get("channels", 1), net.source["channels"]
    if have != want:
        raise FaceSenseError(f"{checkpoint} was trained on {CHANNEL_NAMES[want]} images, {data} ({split}) holds "
                             f"{CHANNEL_NAMES[have]} ones; pack the data with --channels {want}")

    # Scored against the majority label (FER+ included, as its literature reports): never soft targets.
    cfg = dataclasses.replace(net.cfg, loader=loader, workers=workers, soft_labels=False)
    loader = open_split(data, split, cfg, rt.device, train=False, batch_size=batch_size)
    describe = getattr(loader, "describe", None)  # the loader's line on what lives where
    if describe is not None:
        print(describe())
    probs, labels = metrics_module.predict_probs(net.model, loader, tta=tta)
    metrics = compute_metrics(probs, labels, classes)
    report = {**metrics, "split": split, "tta": tta,
              "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": checkpoint_sha,
                             "model": cfg.model, "weights": net.weights, "epoch": net.ckpt["epoch"],
                             "step": net.ckpt["step"], "best_val_accuracy": net.ckpt.get("best_accuracy"),
                             "source": net.source},
              "data": data_identity(data, manifest, split),
              "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__}}
    write_report(out, report, probs, labels, f"{cfg.model} on {split}")
    print_table(metrics, f"{Path(checkpoint).name} on {split} ({net.weights} weights, tta {tta})")
    return report


def write_report(out: Path, report: dict, probs: np.ndarray, labels: np.ndarray, title: str) -> None:
    """report.json (atomically) and its two figures into `out`."""
    from facesense.eval import plots

    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "report.json", json.dumps(report, indent=1) + "\n")
    classes = report["classes"]
    plots.confusion_heatmap(np.array(report["confusion_matrix"]), classes, out / "confusion_matrix_heatmap.png",
                            title)
    plots.roc_curves(probs, labels, classes, {n: r["auc"] for n, r in report["per_class"].items()},
                     out / "roc_curves.png", title)
