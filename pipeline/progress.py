"""A rich progress bar as a context manager yielding `advance(n)`; silent when disabled."""
from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
