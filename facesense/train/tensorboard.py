"""TensorBoard curves of a run (rank 0): `--out/tensorboard/`, a view of what metrics.jsonl holds.

Two TensorBoard runs, because the x axes differ: `steps/` (every --log-every optimizer steps: loss,
images/s, data-wait share) and `epochs/` (one point per metrics.jsonl row, at its epoch number).

A resumed run continues the same curves without two values at one step. A run killed after its
last.pt wrote points that the resumed run writes again (the steps, or epochs, after that
checkpoint). So on resume every event file is cut back to what last.pt covers (steps up to `step`,
epochs up to the last row of `history`), which every reader then sees: TensorBoard's Python loader,
its Rust data server (which ignores restart markers and only drops a tag's points at or after a
step written again) and raw event readers. The new writer also gets `purge_step` (a restart marker
at the first step it will write) so that a TensorBoard already showing the run with the Python
loader drops the points it had read from the cut-off tail.
"""
from __future__ import annotations

from pathlib import Path

from facesense.core.errors import FaceSenseError
from facesense.core.files import TMP_GLOB, atomic_path

MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard, or pass --no-tensorboard"

INTERVAL_TAGS = ("train/loss_interval", "speed/images_per_s", "speed/data_wait_share")
# metrics.jsonl key -> scalar name, for the per-epoch curves.
EPOCH_TAGS = {
    "train_loss": "epoch/train_loss",
    "train_accuracy": "epoch/train_accuracy",
    "val_accuracy": "epoch/val_accuracy",
    "val_auc_macro_ovr": "epoch/val_auc",
    "val_f1_weighted": "epoch/val_f1",
    "lr": "epoch/lr",
    "images_per_s": "epoch/images_per_s",
    "data_wait_share": "epoch/data_wait_share",
}


class Board:
    """TensorBoard curves for one run (rank 0 only; a disabled Board does nothing)."""

    def __init__(self, out: Path, enabled: bool, history: list[dict], step: int):
        """`history`: the metrics.jsonl rows the run resumes with; `step`: the optimizer step it
        resumes at (0 for a new run). Points after those are a killed run's tail and are dropped.

        The writers (and --out/tensorboard/) are made at the first point: a run that fails before it
        logs anything leaves no directory behind (train removes an --out it created and left empty).
        """
        self.steps = self.epochs = self._start = None
        if not enabled:
            return
        try:  # lazily: --no-tensorboard must work without the package
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise FaceSenseError(MISSING) from exc
        last_epoch = max((row["epoch"] for row in history), default=0)
        self._start = (SummaryWriter, Path(out) / "tensorboard", step, last_epoch)

    def _open(self) -> bool:
        """Whether there are writers, opening them at the first point."""
        if self._start is not None:
            summary_writer, root, step, last_epoch = self._start
            self._start = None
            self.steps = open_writer(summary_writer, root / "steps", step)
            self.epochs = open_writer(summary_writer, root / "epochs", last_epoch)
        return self.steps is not None

    def interval(self, step: int, loss: float, images_per_s: float, data_wait_share: float) -> None:
        """The --log-every point at optimizer step `step` (queued for the writer's thread: no disk
        wait inside the step loop)."""
        if not self._open():
            return
        for tag, value in zip(INTERVAL_TAGS, (loss, images_per_s, data_wait_share)):
            self.steps.add_scalar(tag, float(value), global_step=step)

    def epoch(self, row: dict) -> None:
        """One metrics.jsonl row at its epoch number (None values, e.g. an AUC with a missing class,
        are left out); waits until it and the queued interval points are in the files, so that a
        killed run keeps its curves."""
        if not self._open():
            return
        for key, tag in EPOCH_TAGS.items():
            if row.get(key) is not None:
                self.epochs.add_scalar(tag, float(row[key]), global_step=row["epoch"])
        self.epochs.flush()
        self.steps.flush()

    def close(self) -> None:
        for writer in (self.steps, self.epochs):
            if writer is not None:
                writer.close()
        self.steps = self.epochs = self._start = None


def open_writer(summary_writer: type, log_dir: Path, last: int):
    """A writer continuing the curves in `log_dir` after step `last` (what the checkpoint covers).

    Its file sorts after the old ones (readers go by name, which starts with the writer's start
    second), which matters to the Rust data server: a point at step s drops that tag's points >= s.
    """
    for tmp in log_dir.glob(TMP_GLOB):  # a cut killed mid-write: its name has "tfevents" in it too
        tmp.unlink()
    for path in sorted(log_dir.glob("*tfevents*")):
        cut_after(path, last)
    return summary_writer(str(log_dir), purge_step=last + 1)


def cut_after(path: Path, last: int) -> None:
    """Rewrite event file `path` without the events past step `last` (if it has any); the file's
    version records stay, whatever their step, so that readers still know its format."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    records = list(RawEventFileLoader(str(path)).Load())  # a killed writer's torn last record is skipped
    keep = [r for r in records if keeps(Event.FromString(r), last)]
    if len(keep) == len(records):
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = RecordWriter(f)
        for record in keep:
            writer.write(record)


def keeps(event, last: int) -> bool:
    return event.HasField("file_version") or event.step <= last
