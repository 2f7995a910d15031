"""The run directory (`train --out`): one writer at a time, no run replaced by accident, no empty dirs left.

- Lock: `--out/.train.lock`, held with flock(2) for the whole run. The kernel drops the
  lock when the process ends however it ends (exit, exception, SIGKILL, crash), so a
  lock left by a dead run never blocks; a second train into the same --out fails at once.
- Guard: a directory that holds a run (best.pt, last.pt or metrics.jsonl) needs --resume
  to continue it or --overwrite to replace it.
- Cleanup: on exit the lock file goes, and so do the directories the run created if
  they are still empty (a run that failed before its first checkpoint leaves no trace).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from facesense.core.errors import FaceSenseError
from facesense.core.files import require_dir

LOCK = ".train.lock"
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl")  # any of them: --out holds a run


def check_outside_data(out: Path | str, data: Path | str) -> None:
    """Refuse an --out that is --data or lies inside it: train never writes to the packed data."""
    out, data = Path(out).resolve(), Path(data).resolve()
    if out == data or data in out.parents:
        raise FaceSenseError(f"--out {out} is inside --data {data}: train never writes to the packed data; "
                             f"choose an --out outside it")


def existing_run(out: Path) -> list[str]:
    """The run files already in `out` (empty when it holds no run)."""
    return [name for name in RUN_FILES if (out / name).exists()]


class RunLock:
    """Exclusive use of a run directory; `acquire` creates it, `release` undoes what acquire made."""

    def __init__(self, out: Path | str):
        self.out = Path(out)
        self.fd: int | None = None
        self.created: list[Path] = []  # directories this run made, deepest first

    def acquire(self) -> None:
        out = require_dir(self.out)
        self.created = [p for p in (out, *out.parents) if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FaceSenseError(f"--out {out}: cannot create it ({exc.strerror})") from exc
        path = out / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise FaceSenseError(f"--out {out}: cannot write there ({exc.strerror}); choose another --out") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise FaceSenseError(f"{out} is in use by another facesense train (pid {holder}); wait for it to "
                                     f"finish or choose another --out") from None
            # A run that just ended may have unlinked the file we locked: lock the one at `path`.
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        (self.out / LOCK).unlink(missing_ok=True)  # while still held: no one can lock it in between
        os.close(self.fd)
        self.fd = None
        for path in self.created:  # only empty ones: rmdir never deletes a file
            try:
                path.rmdir()
            except OSError:
                break
