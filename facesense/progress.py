"""The live training bar (rank 0 only): epoch, step, loss, images/s, share of time waiting for data."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressBar:
    """Updated every step (no device sync); loss, img/s and data wait change at log points only."""

    def __init__(self, enabled: bool, epochs: int):
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
            TextColumn("data wait {task.fields[wait]}"), TimeRemainingColumn(), disable=not enabled)
        self.enabled, self.task = enabled, None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def new_epoch(self, epoch: int, steps: int, done: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("train", total=steps, completed=done, epoch=epoch + 1,
                                           loss="-", ips="-", wait="-")

    def advance(self) -> None:
        self.progress.advance(self.task)

    def show(self, loss: float, ips: float, wait: float) -> None:
        self.progress.update(self.task, loss=f"{loss:.4f}", ips=f"{ips:,.0f}", wait=f"{wait:.0%}")

    def print(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, soft_wrap=True)
