"""predict's --out: protected as train's and eval's are, and described by predictions.meta.json.

A DIR holding an earlier run's predictions.jsonl (and its meta file) or annotated files is
refused unless --overwrite, which deletes only those, once every other check has passed. The
temporaries of a run killed outright (SIGKILL, power loss: pid gone) are removed by the next run
into the same DIR, as pack removes its stale partials; a live run's are left alone.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from facesense.core.errors import FaceSenseError
from facesense.core.files import write_bytes
from facesense.infer.sources import ANNOTATED, IMAGE_EXTS
from pipeline.staging import process_gone

PREDICTIONS = "predictions.jsonl"
META = "predictions.meta.json"  # beside predictions.jsonl: schema version, model, detector, options
ANNOTATED_EXTS = IMAGE_EXTS + (".mp4",)  # what predict writes under annotated/ (and --overwrite deletes)
# atomic_path's temporaries (.NAME.tmp-PID, .STEM.tmp-PID.SUFFIX) and FaceSense <= 79297b0's
# .predictions.jsonl.partial-PID: the pid tells a live run's from a killed one's.
TEMPORARY = re.compile(r"^\..+\.(?:tmp|partial)-(\d+)(?:\.[A-Za-z0-9]+)?$")


def earlier_outputs(out: Path, overwrite: bool) -> list[Path]:
    """An earlier run's predictions.jsonl, its meta file and annotated pictures/videos in `out`: refused
    unless `overwrite` (then returned, for `open_out` to delete once every other check has passed)."""
    found = [out / name for name in (PREDICTIONS, META) if (out / name).is_file()]
    annotated = sorted(f for f in (out / ANNOTATED).rglob("*") if f.is_file() and not f.is_symlink()
                       and f.suffix.lower() in ANNOTATED_EXTS and not TEMPORARY.match(f.name))
    found += annotated
    if found and not overwrite:
        what = []
        if (out / PREDICTIONS) in found:
            with open(out / PREDICTIONS, "rb") as fh:
                lines = sum(1 for _ in fh)
            what.append(f"{PREDICTIONS} ({lines} line{'s' * (lines != 1)})")
        elif (out / META) in found:
            what.append(META)
        if annotated:
            what.append(f"{len(annotated)} annotated file{'s' * (len(annotated) != 1)}")
        raise FaceSenseError(f"--out {out}: holds an earlier run's {' and '.join(what)}; --overwrite replaces "
                             f"them (deleting those files only), or choose another --out")
    return found


def open_out(out: Path, earlier: list[Path]) -> None:
    """`out` made, a killed run's temporaries removed, `earlier` (see earlier_outputs) deleted."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FaceSenseError(f"--out {out}: cannot create {exc.filename or out} ({exc.strerror or exc}); "
                             f"choose another --out") from exc
    remove_stale_temporaries(out)
    try:
        for path in earlier:
            path.unlink(missing_ok=True)
        for folder in sorted({p.parent for p in earlier if p.parent != out}, key=lambda p: -len(p.parts)):
            while folder != out and folder.is_dir() and not any(folder.iterdir()):  # its files were ours
                folder.rmdir()
                folder = folder.parent
    except OSError as exc:
        raise FaceSenseError(f"--out {out}: cannot delete the earlier run's {exc.filename} "
                             f"({exc.strerror or exc})") from exc


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporaries that runs into `out` killed outright left (their pid is gone): in `out`
    and under its annotated/. A live run's (another predict into the same DIR) are left alone."""
    folders = [out] + [Path(root) for root, _, _ in os.walk(out / ANNOTATED)]
    for folder in folders:
        for path in folder.iterdir():
            match = TEMPORARY.match(path.name)
            if match and path.is_file() and process_gone(int(match.group(1))):
                path.unlink(missing_ok=True)


def run_meta(recognizer, opts, srcs: list[str]) -> dict:
    """What predictions.meta.json says of a run: enough to know which model and settings made its lines."""
    from dataclasses import asdict

    import facesense
    from facesense.infer.recognizer import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, "predictions": PREDICTIONS, "facesense_version": facesense.__version__,
            "model": recognizer.model_info(), "detector": recognizer.detector_info(), "options": asdict(opts),
            "sources": list(srcs)}


def write_meta(out: Path, meta: dict) -> None:
    write_bytes(out / META, json.dumps(meta, indent=2) + "\n")
