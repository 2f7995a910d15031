"""Image-folder data sets, SRC/<split>/<class>/<file>: the scan, and which class is which index.

Split folders are `train`, `val` (or `valid`, `validation`) and `test`, in any case; other
entries at the top are ignored. FER2013's Kaggle download is this layout with FER2013's
class names and its Usage as a file-name prefix (Training_, PublicTest_, PrivateTest_): a
prefix decides the split of its file, whatever folder it is in. A train file without one
gets the split "train, val decided by pack" (255): pack carves the stratified val slice
from those when the source has no val images at all.

Class order is never alphabetical: FER2013's when the folder names are its 7 classes,
FER+'s when they are its 8, otherwise `--classes a,b,c` (required when the folders are
numbers, as AffectNet exports are: folder `3` is the 4th name of --classes).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from pipeline.classes import FER2013_CLASSES, FERPLUS_CLASSES, SPLIT_FOLDERS, SPLITS, USAGE_TO_SPLIT
from pipeline.errors import PackError, clip
from pipeline.folders import FolderScan

TRAIN_UNDECIDED = 255  # a train file whose val slice pack decides


def split_folders(src: Path) -> dict[str, str]:
    """split -> folder name of the split folders in src (any case); PackError for two val folders."""
    found: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as exc:
        raise PackError(f"{src}: cannot read ({exc.strerror})") from exc
    for entry in entries:
        split = SPLIT_FOLDERS.get(entry.name.lower())
        if split is None or not _kind(entry) == "dir":
            continue
        if split in found:
            raise PackError(f"{src}: both {found[split]}/ and {entry.name}/ would be the {split} split; "
                            f"keep one of them")
        found[split] = entry.name
    return found


def scan_image_folders(src: Path, classes: tuple[str, ...] | None = None) -> FolderScan:
    """List image files with their label and split; PackError on layout problems.

    `classes`: --classes, the label order to map the folder names onto (None: from the names).
    """
    tops = split_folders(src)
    if not tops:
        raise PackError(f"{src}: not an image-folder layout: expected {src}/train/<class>/ (and val/, test/), "
                        f"{src}/EmoLabel/list_patition_label.txt (RAF-DB), or the FER2013 CSV file")
    listing = []  # (split, top folder, class folder entry, file names)
    bad = []
    for split in SPLITS:
        if split not in tops:
            continue
        top = tops[split]
        for class_dir in sorted(os.scandir(src / top), key=lambda e: e.name):
            if class_dir.name.startswith("."):
                continue
            kind = _kind(class_dir)
            if kind != "dir":
                raise PackError(f"{class_dir.path}: {'unexpected file' if kind == 'file' else kind}; "
                                f"{top}/ must hold one folder per class")
            names = []
            for entry in sorted(os.scandir(class_dir.path), key=lambda e: e.name):
                kind = _kind(entry)
                if entry.name.startswith(".") or kind == "dir":
                    continue
                if kind == "file":
                    names.append(entry.name)
                else:  # never opened: reading a FIFO would wait forever
                    bad.append((f"{top}/{class_dir.name}/{entry.name}", kind))
            listing.append((split, top, class_dir, names))
    folders = {}  # folder name -> the first path it was seen at (for errors)
    for _, _, class_dir, _ in listing:
        folders.setdefault(class_dir.name, class_dir.path)
    class_names, index_of, order = resolve_classes(src, folders, classes)
    paths, labels, splits = [], [], []
    for split, top, class_dir, names in listing:
        paths += [f"{top}/{class_dir.name}/{name}" for name in names]
        labels += [index_of[class_dir.name]] * len(names)
        splits += [_split_of(split, name) for name in names]
    if not paths and not bad:
        raise PackError(f"{src}: no images found under {' or '.join(t + '/' for t in tops.values())}")
    return FolderScan(paths, np.array(labels, np.uint8), np.array(splits, np.uint8), bad, class_names, order)


def _split_of(split: str, name: str) -> int:
    """FER2013's Usage from the file-name prefix; without one the folder decides."""
    usage = name.split("_", 1)[0]
    if usage in USAGE_TO_SPLIT:
        return SPLITS.index(USAGE_TO_SPLIT[usage])
    return TRAIN_UNDECIDED if split == "train" else SPLITS.index(split)


def parse_classes(text: str | None) -> tuple[str, ...] | None:
    """--classes a,b,c -> ("a", "b", "c"); PackError for empty or repeated names."""
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if not names or any(not name for name in names):
        raise PackError(f"--classes {clip(text)!r}: expected class names separated by commas, e.g. "
                        f"--classes neutral,happy,sad")
    lowered = [name.lower() for name in names]
    repeated = sorted({name for name in lowered if lowered.count(name) > 1})
    if repeated:
        raise PackError(f"--classes names {', '.join(repeated)} more than once; each class once, in label order")
    return names


def resolve_classes(src: Path, folders: dict[str, str], requested: tuple[str, ...] | None
                    ) -> tuple[tuple[str, ...], dict[str, int], dict]:
    """(classes, folder name -> label, class_order for the manifest) from the class folder names.

    `folders`: every class folder name (any split) -> the path of one of them, for the error.
    """
    names = sorted(folders, key=lambda n: (len(n), n) if n.isdigit() else (0, n))
    found = clip(", ".join(names), 120)
    numeric = [n for n in names if n.isdigit()]
    if numeric and len(numeric) != len(names):
        first = next(n for n in names if not n.isdigit())
        raise PackError(f"{folders[first]}: class folders mix numbers and names ({found}); name them one way")
    if requested is not None:
        given = clip(", ".join(requested), 120)
        lowered = [c.lower() for c in requested]
        if numeric:
            index_of = {n: int(n) for n in names}
            for n in names:
                if int(n) >= len(requested):
                    raise PackError(f"{folders[n]}: folder {n} would be class {n}, but --classes names "
                                    f"{len(requested)} (0..{len(requested) - 1}: {given})")
            detail = f"numbered folders 0..{len(requested) - 1} are the --classes names in order"
        else:
            index_of = {}
            for n in names:
                if n.lower() not in lowered:
                    raise PackError(f"{folders[n]}: class folder {n!r} is not in --classes ({given}); "
                                    f"folders found: {found}")
                index_of[n] = lowered.index(n.lower())
            detail = "folder names matched to --classes (any case), in --classes order"
        missing = sorted(set(range(len(requested))) - set(index_of.values()))
        if missing:
            want = f"folder {missing[0]}" if numeric else f"a folder {requested[missing[0]]!r}"
            raise PackError(f"{src}: --classes lists {requested[missing[0]]!r} (class {missing[0]}) but no split "
                            f"has {want}; folders found: {found}; --classes: {given}")
        return tuple(requested), index_of, {"source": "--classes", "detail": detail}
    if numeric:
        raise PackError(f"{src}: class folders are numbers ({found}); pass --classes with one name per number "
                        f"in label order (folder 0 first), e.g. AffectNet: --classes neutral,happy,sad,surprise,"
                        f"fear,disgust,anger,contempt")
    for known, source in ((FER2013_CLASSES, "fer2013"), (FERPLUS_CLASSES, "ferplus")):
        if all(n.lower() in known for n in names):
            index_of = {n: known.index(n.lower()) for n in names}
            what = "FER2013's" if source == "fer2013" else "FER+'s"
            return known, index_of, {"source": source,
                                     "detail": f"folder names are {what} classes (any case), in {what} label order"}
    first = next(n for n in names if n.lower() not in FER2013_CLASSES)
    raise PackError(f"{folders[first]}: unknown class folder {first!r}; without --classes the folders must all "
                    f"be FER2013's ({', '.join(FER2013_CLASSES)}) or all FER+'s ({', '.join(FERPLUS_CLASSES)}), any "
                    f"case; found: {found}; or pass --classes a,b,c in label order")


def _kind(entry: os.DirEntry) -> str:
    """'dir', 'file' (a regular file, or a link to one), or why the entry cannot be an image."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        mode = entry.stat().st_mode
    except OSError as exc:  # a symlink loop or a dangling link
        return f"cannot read ({exc.strerror})"
    what = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{what}, not an image file"
