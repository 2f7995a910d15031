"""Helpers for the tests: tiny made-up shards, and a CLI runner for subprocesses.

Run as a script it is `facesense` itself, with two test hooks set by environment:
  FS_KILL_AFTER_STEPS=N  the process SIGKILLs itself when the training loader is asked
                         for batch N + 1, i.e. after N optimizer steps (and any save there)
  FS_DUMP_WEIGHTS=DIR    after training, every rank saves its parameters to DIR/rank<R>.pt
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.classes import FER2013_CLASSES  # noqa: E402
from pipeline.shards import FORMAT_VERSION, MANIFEST, split_entry, write_shard  # noqa: E402

MODEL = "test_efficientnet"  # a ~100k-parameter timm EfficientNet: the real code path, fast on CPU
COUNTS = {"train": 96, "val": 28, "test": 21}


def write_shards(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], classes,
                 shard_size: int, votes: dict[str, np.ndarray] | None = None, **manifest_extra) -> Path:
    """{split: (images, labels, ids)} -> shards of at most shard_size images + manifest.json, as pack writes them;
    `votes` {split: (N, 10) uint8}: FER+ vote counts kept beside the labels (manifest "votes": true)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, (images, labels, ids) in splits.items():
        shards = [write_shard(out, split, k, images[i:i + shard_size], labels[i:i + shard_size],
                              ids[i:i + shard_size], tuple(classes),
                              votes=votes[split][i:i + shard_size] if votes else None)
                  for k, i in enumerate(range(0, len(images), shard_size))]
        entries[split] = split_entry(labels, tuple(classes), shards)
    manifest = {"format_version": FORMAT_VERSION, "classes": list(classes), "splits": entries,
                "votes": bool(votes), **manifest_extra}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def make_shards(out: Path, counts: dict[str, int] = COUNTS, classes=FER2013_CLASSES, seed: int = 0,
                shard_size: int = 40, shape: tuple[int, int] = (48, 48), channels: int = 1,
                votes: bool = False) -> Path:
    """Shards + manifest in the format facesense pack writes: class = grey level + noise (learnable).

    shape (H, W) and channels 1 (gray) or 3 (RGB: each class also has its own hue, so colour matters);
    votes: FER+-like vote counts too (10 columns, the first len(classes) the classes', 10 votes per image,
    most of them for the image's label), so --soft-labels can train on them."""
    rng = np.random.default_rng(seed)
    base = np.linspace(20, 230, len(classes))
    splits, all_votes = {}, {}
    for split, n in counts.items():
        labels = rng.permutation(np.arange(n) % len(classes))
        grey = base[labels][:, None, None] + rng.integers(-15, 16, (n, *shape))
        if channels == 3:
            tint = np.stack([np.cos(labels), np.sin(labels), -np.cos(labels)], 1)[:, None, None, :] * 20
            grey = grey[..., None] + tint
        images = np.clip(grey, 0, 255).astype(np.uint8)
        splits[split] = images, labels, [f"{split}/{i}.png" for i in range(n)]
        if votes:
            counts_ = np.zeros((n, 10), np.uint8)
            counts_[np.arange(n), labels] = 7
            counts_[np.arange(n), rng.integers(0, len(classes), n)] += 3  # a second opinion (or more of the same)
            all_votes[split] = counts_
    return write_shards(out, splits, classes, shard_size, votes=all_votes or None,
                        source={"format": "test", "fingerprint": f"made-up-{seed}"})


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A tiny, fast `facesense train` command line (6 steps per epoch; the reference augmentation engine:
    no compile in every test process)."""
    return ["train", "--data", str(data), "--out", str(out), "--model", MODEL, "--epochs", "2",
            "--batch-size", "16", "--log-every", "2", "--device", "cpu", "--loader", "resident",
            "--workers", "0", "--lr", "0.01", "--warmup-epochs", "0.5", "--cpu-augment", "reference", *extra]


def wrap_train_batches(monkeypatch, transform) -> None:
    """Every training loader made from now on passes its batches through transform(loader, images, labels)."""
    import pipeline.loaders as loaders
    from benchmarks.env import with_train_batch_hook

    monkeypatch.setattr(loaders, "make_loader", with_train_batch_hook(
        loaders.make_loader, lambda loader, n, images, labels: transform(loader, images, labels)))


def child_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("FS_KILL_AFTER_STEPS", "FS_DUMP_WEIGHTS"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`facesense ARGS` in a fresh process (with this file's test hooks)."""
    return subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install_hooks() -> None:
    kill_after = int(os.environ.get("FS_KILL_AFTER_STEPS", "0"))
    dump = os.environ.get("FS_DUMP_WEIGHTS")
    if kill_after:
        import pipeline.loaders as loaders
        from benchmarks.env import with_train_batch_hook

        def kill(loader, n, images, labels):
            if n > kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return images, labels

        loaders.make_loader = with_train_batch_hook(loaders.make_loader, kill)
    if dump:
        import torch

        import facesense.train.loop as train_module

        train = train_module.train

        def dumping_train(cfg):
            result = train(cfg)
            rank = int(os.environ.get("RANK", "0"))
            torch.save({k: v.detach().cpu() for k, v in result.model.named_parameters()},
                       Path(dump) / f"rank{rank}.pt")
            return result

        train_module.train = dumping_train


if __name__ == "__main__":
    _install_hooks()
    from facesense.cli import main

    sys.argv = ["facesense", *sys.argv[1:]]
    main()
