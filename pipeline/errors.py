"""Errors with messages meant for the user: one line naming the file/row and the fix."""
from __future__ import annotations

import errno
import os
from pathlib import Path


class FaceSenseError(Exception):
    """Every problem a user can cause and fix (bad option, data, checkpoint): the message says how.

    The root of all of them, here at the bottom of the layers so `pipeline` can raise it too;
    `facesense.cli.main` catches it once and prints `error: <message>` with `exit_code`.
    """

    exit_code = 1


class PackError(FaceSenseError):
    """Bad input to `facesense pack`; nothing is written when it is raised."""


class BadItem(PackError):
    """One bad image or CSV row; `--skip-bad` records it instead of failing."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class ShardError(FaceSenseError):
    """A shard directory that is missing, corrupt, or of an unknown format version."""


def no_space(exc: BaseException) -> bool:
    """Did a write fail for lack of space? Also when a library (HDF5, torch's zip writer) says so only in words."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def mount_point(path: Path | str) -> str:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def clip(text: str, limit: int = 40) -> str:
    """At most `limit` characters of user input, for an error line (a bad file can be one 2 MB line)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def require_dir(path: Path | str, flag: str = "--out", error: type = FaceSenseError) -> Path:
    """`path` as a Path, refusing (with `error`) one that exists and is not a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path}: is a file, not a directory; choose another {flag}")
    return path
