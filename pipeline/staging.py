"""Pack's output transaction: build DIR in a hidden directory beside it, swap it in only when complete.

`staged_dir(out, owned)` is the whole transaction. The partial directory is
`.DIR.partial-<pid>-<random>` beside DIR, so a pack killed outright (SIGKILL) leaves
one whose pid is gone, and the next pack into DIR removes it. On success the old DIR
is swapped out and only the `owned` names in it are deleted; on any failure or
interrupt nothing of the attempt is left, not even the parent directories it created.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import PackError, mount_point, no_space
from pipeline.interrupts import raise_if_interrupted


@contextmanager
def staged_dir(out: Path, owned: set[str]) -> Iterator[Path]:
    """Yield an empty directory to build `out` in; it replaces `out` when the block ends without error.

    `owned`: the names in an existing `out` that may be deleted (an earlier pack's files).
    No space / no permission become one-line PackErrors; anything else is raised as it came.
    """
    new_parents = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackError(f"--out {out}: cannot create {exc.filename or out.parent} ({exc.strerror})") from exc
    remove_stale_partials(out)
    prefix = f".{out.name}.partial-{os.getpid()}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; DIR gets the usual permissions
        yield tmp
        raise_if_interrupted()  # an interrupt Python swallowed must not publish the output
        _replace_dir(tmp, out, owned)
    except BaseException as exc:
        _discard(out, prefix, new_parents)
        if isinstance(exc, (OSError, RuntimeError)) and no_space(exc):  # HDF5 says it in a traceback
            raise PackError(f"no space left on device {mount_point(out.parent)} (writing {out}); "
                            f"nothing was written, {out} is as it was") from exc
        if isinstance(exc, PermissionError):
            raise PackError(f"{exc.filename or out.parent}: permission denied; choose another --out") from exc
        raise


def remove_stale_partials(out: Path) -> None:
    """Delete temporary dirs left by packs into `out` that were killed (their pid is gone)."""
    prefix = f".{out.name}.partial-"
    for path in out.parent.glob(f"{glob.escape(prefix)}*"):
        try:
            pid = int(path.name[len(prefix):].split("-")[0])  # out.name may itself hold '-'
        except ValueError:
            continue
        if process_gone(pid):
            shutil.rmtree(path, ignore_errors=True)


def process_gone(pid: int) -> bool:
    """Whether no process `pid` exists (its temporaries are then a killed run's, safe to remove)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, someone else's
        return False
    return False


def _discard(out: Path, prefix: str, new_parents: list[Path]) -> None:
    """Remove this attempt's partials and the parents it created: a failed pack leaves no trace."""
    # By prefix, not by the yielded path: an interrupt can land inside mkdtemp, after the mkdir.
    for partial in out.parent.glob(f"{glob.escape(prefix)}*"):
        shutil.rmtree(partial, ignore_errors=True)
    for parent in new_parents:
        try:
            parent.rmdir()
        except OSError:
            break


def _replace_dir(tmp: Path, out: Path, owned: set[str]) -> None:
    """Move the finished tmp into place; an old DIR is swapped out, then the files we wrote are deleted.

    Only the `owned` names go (checked before the pack): a file that appeared in DIR
    since then is kept in the swapped-out directory, never deleted.
    """
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        for name in owned:
            (old / name).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:
            print(f"note: files appeared in {out} during the pack; they were moved to {old}", file=sys.stderr)
    else:
        tmp.rename(out)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back (no threads run here yet)
    os.umask(mask)
    return mask
