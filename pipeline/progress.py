"""The project's one wrapper around rich's progress display: the pack's decode bar, the training bar, predict's frame bar."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class Bar:
    """`label`, the bar, done/total, then `fields`, then the time left; draws nothing when disabled.

    `label` and `fields` are rich format strings over the task: "loss {task.fields[loss]}".
    `console`: draw on this rich Console (one the caller also prints its messages to, so they
    appear above the bar); otherwise a fresh one on stderr when `stderr`, else rich's default.
    """

    def __init__(self, label: str, *fields: str, enabled: bool = True, stderr: bool = False,
                 transient: bool = False, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if console is None and stderr:
            console = Console(stderr=True)
        self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields),
                                 TimeRemainingColumn(), console=console, transient=transient, disable=not enabled)
        self.enabled, self.task = enabled, None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def restart(self, total: int | None, completed: int = 0, **fields) -> None:
        """A fresh task (the previous one is removed), `completed` of `total` done (None: unknown total)."""
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("", total=total, completed=completed, **fields)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def update(self, **fields) -> None:
        self.progress.update(self.task, **fields)

    def print(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """A transient bar on stderr as a context manager yielding `advance(n)`; silent when disabled
    or when stderr is not a terminal (and rich is then not even imported)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    with Bar(description, stderr=True, transient=True) as bar:
        bar.restart(total)
        yield bar.advance
