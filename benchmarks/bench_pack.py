"""Pack throughput: the FER2013 folder and a 35,887-row CSV, against a naive PIL loop.

Run: facesense bench pack --data ../shared/fer2013 [--csv fer2013.csv] [--json PATH]

The naive baseline is what a first script does: one process, PIL open + convert
per file, append to a list, stack, write one HDF5 file. Both read files from the
page cache (a warm-up pass runs first). Without --csv a CSV is made from the folder
(the withheld PrivateTest third is filled with mirrored PublicTest images: the
parser's cost depends on row count and digits, not on which faces they are).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from benchmarks.env import BadOption, at_least, median_time, write_result
from pipeline.classes import folder_class_index
from pipeline.errors import PackError
from pipeline.imagefolders import scan_image_folders
from pipeline.pack import PackOptions, detect_format, pack

CSV_ROWS = 35_887


def naive_pack(src: Path, out_file: Path) -> int:
    from PIL import Image

    images, labels = [], []
    for path in sorted(src.glob("*/*/*")):
        images.append(np.asarray(Image.open(path).convert("L")))
        labels.append(folder_class_index(path.parent.name))
    with h5py.File(out_file, "w") as f:
        f["images"] = np.stack(images)
        f["labels"] = np.array(labels, np.uint8)
    return len(images)


def make_csv(src: Path, path: Path) -> int:
    """fer2013.csv with CSV_ROWS rows from the folder's images (see module docstring)."""
    tmp = path.parent / "shards-for-csv"
    pack(src, tmp, PackOptions(), show_progress=False)
    from pipeline.shards import read_split

    rows = []
    for split in ("train", "val"):
        data = read_split(tmp, split)
        usage = {"train": "Training", "val": "PublicTest"}[split]
        rows += [(int(l), img, usage) for l, img in zip(data.labels, data.images)]
    val = [r for r in rows if r[2] == "PublicTest"]
    while len(rows) < CSV_ROWS:
        label, img, _ = val[(len(rows)) % len(val)]
        rows.append((label, img[:, ::-1], "PrivateTest"))
    with open(path, "w") as fh:
        fh.write("emotion,pixels,Usage\n")
        for label, img, usage in rows[:CSV_ROWS]:
            fh.write(f"{label},{' '.join(map(str, img.ravel().tolist()))},{usage}\n")
    shutil.rmtree(tmp)
    return min(len(rows), CSV_ROWS)


def check_options(data: Path, csv: Path | None, repeats: int) -> None:
    """BadOption for what cannot be timed: --repeats under 1, a --data that is not a FER2013 image-folder
    tree with images (what pack reads), a --csv that is not a file."""
    at_least(1, repeats=repeats)
    for flag, path, fmt in (("--data", data, "folders"), ("--csv", csv, "csv")):
        if path is None:
            continue
        try:
            detect_format(Path(path), fmt)
            if fmt == "folders":
                scan_image_folders(Path(path))
        except PackError as exc:
            raise BadOption(f"{flag} {exc}") from None


def run(data: Path, csv: Path | None, repeats: int, json_path: Path) -> dict:
    check_options(data, csv, repeats)
    work = Path(tempfile.mkdtemp(prefix="facesense-bench-pack-"))
    try:
        n_folder = sum(1 for _ in data.glob("*/*/*"))
        naive_s, naive_all = median_time(lambda: naive_pack(data, work / "naive.h5"), repeats)
        fast_s, fast_all = median_time(
            lambda: pack(data, work / "folder", force=True, show_progress=False), repeats)
        if csv is None:
            csv = work / "fer2013.csv"
            make_csv(data, csv)
        n_csv = sum(1 for _ in open(csv, "rb")) - 1
        csv_s, csv_all = median_time(
            lambda: pack(csv, work / "csv", force=True, show_progress=False), repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = [
        {"what": "folder", "method": "naive_pil_loop", "images": n_folder, "seconds": naive_s,
         "images_per_s": n_folder / naive_s, "all_seconds": naive_all},
        {"what": "folder", "method": "facesense_pack", "images": n_folder, "seconds": fast_s,
         "images_per_s": n_folder / fast_s, "all_seconds": fast_all},
        {"what": "csv", "method": "facesense_pack", "images": n_csv, "seconds": csv_s,
         "images_per_s": n_csv / csv_s, "all_seconds": csv_all},
    ]
    payload = {"benchmark": "pack", "results": results, "speedup_vs_naive": naive_s / fast_s,
               "config": {"data": str(data), "csv": str(csv), "repeats": repeats,
                          "note": "files in page cache (warm-up pass first); median of repeats"}}
    write_result(json_path, payload)
    for r in results:
        print(f"{r['what']:6s} {r['method']:16s} {r['images']:6d} images  {r['seconds']:6.2f} s  "
              f"{r['images_per_s']:9.0f} img/s")
    print(f"facesense pack is {naive_s / fast_s:.1f}x the naive loop; wrote {json_path}")
    return payload
