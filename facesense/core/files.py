"""Writing output files: whole or not at all, and a clear line when the disk says no.

Every file FaceSense writes (checkpoints, metrics.jsonl, report.json, exports, predictions,
annotated pictures and videos) goes through `atomic_path`: the writer fills a temporary
file beside the target, which is fsynced and renamed over it only when complete. A crash,
a full disk or a Ctrl-C/SIGTERM (turned into KeyboardInterrupt by `cli.main`) leaves the
previous file as it was and no temporary behind.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from facesense.core.errors import FaceSenseError
from pipeline.errors import mount_point, no_space, require_dir

__all__ = ["TMP_GLOB", "atomic_path", "require_dir", "tmp_path_for", "write_bytes", "write_error"]

TMP_GLOB = ".*.tmp-*"  # what atomic_path's temporaries look like (a killed run's are removed by train)


def tmp_path_for(path: Path, keep_suffix: bool = False) -> Path:
    """The temporary beside `path`: `.name.tmp-PID`, or `.stem.tmp-PID.suffix` for writers that
    choose the container by the file's suffix (OpenCV's VideoWriter)."""
    if keep_suffix:
        return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: Path | str, keep_suffix: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on any failure it is removed.

    An OSError (disk full, permission) becomes one FaceSenseError line naming the file and
    whether the previous one is kept.
    """
    path = Path(path)
    tmp = tmp_path_for(path, keep_suffix)
    try:
        yield tmp
        if fsync and tmp.exists():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_error(path: Path, exc: OSError) -> FaceSenseError:
    kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
    why = (f"no space left on device {mount_point(path.parent)}" if no_space(exc)
           else f"cannot write it ({exc.strerror or exc})")
    return FaceSenseError(f"{path}: {why}; {kept}")


def write_bytes(path: Path | str, data: bytes | str) -> None:
    """`path` holds exactly `data` afterwards, or is as it was."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
