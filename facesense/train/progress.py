"""The live training bar (rank 0 only): epoch, step, loss, images/s, share of time waiting for data."""
from __future__ import annotations

from pipeline.progress import Bar


class ProgressBar(Bar):
    """Updated every step (no device sync); loss, img/s and data wait change at log points only."""

    def __init__(self, enabled: bool, epochs: int):
        super().__init__("epoch {task.fields[epoch]}/" + str(epochs), "loss {task.fields[loss]}",
                         "{task.fields[ips]} img/s", "data wait {task.fields[wait]}", enabled=enabled)

    def new_epoch(self, epoch: int, steps: int, done: int) -> None:
        self.restart(steps, done, epoch=epoch + 1, loss="-", ips="-", wait="-")

    def show(self, loss: float, ips: float, wait: float) -> None:
        self.update(loss=f"{loss:.4f}", ips=f"{ips:,.0f}", wait=f"{wait:.0%}")
