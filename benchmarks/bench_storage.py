"""FER2013 packed `--store raw` against `--store encoded`: pack images/s, bytes on disk, and how far the
encoded pack's decoded pixels are from the raw pack's.

Run: facesense bench storage --source ../shared/fer2013 --repeats 3 --json benchmarks/results/storage-cpu.json

The two packs take turns (raw, encoded, raw, encoded, ...) after one untimed round of each (files in the
page cache), so a noisy neighbour slows both alike; the median of each is reported, with images/s over
every image packed (all splits).

Pixels: the encoded pack's file bytes are decoded by the loaders' CPU decoder pool (Pillow, the pack's
own decode rule) and, as a second libjpeg build, by torchvision's CPU `decode_jpeg` (its bundled
libjpeg-turbo); each is compared with the raw pack's pixels, row for row (rows matched by id): the
largest absolute difference, the share of pixels that differ, and the share of images with any
difference. The pool's decode images/s is what the stream loader pays per image at 48 px.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.env import BadOption, at_least, write_result
from pipeline.errors import PackError


def check_source(source: Path) -> None:
    """BadOption unless `source` is a source pack can read (one line naming the problem)."""
    from pipeline.pack import detect_format

    try:
        detect_format(Path(source), "auto")
    except PackError as exc:
        raise BadOption(f"--source {exc}") from None


def pack_into(source: Path, out: Path, store: str, workers: int | None = None) -> dict:
    from pipeline.pack import PackOptions, pack

    manifest, _ = pack(source, out, PackOptions(store=store), workers=workers, force=True, show_progress=False)
    return manifest


def time_packs(source: Path, work: Path, stores: list[str], repeats: int, workers: int | None) -> dict:
    """Per store: the seconds of each timed pack, the stores taking turns after one untimed round."""
    seconds = {store: [] for store in stores}
    for round_ in range(repeats + 1):
        for store in stores:
            start = time.perf_counter()
            pack_into(source, work / store, store, workers)
            if round_:  # round 0 warms the page cache and the workers' imports
                seconds[store].append(time.perf_counter() - start)
    return seconds


def disk_bytes(pack_dir: Path) -> int:
    return sum(p.stat().st_size for p in pack_dir.iterdir() if p.suffix == ".h5")


def compare(decoded: np.ndarray, raw: np.ndarray) -> dict:
    """How `decoded` differs from `raw` (same shape, uint8)."""
    diff = np.abs(decoded.astype(np.int16) - raw.astype(np.int16))
    per_image = diff.reshape(len(diff), -1).max(axis=1)
    return {"max_abs_diff": int(diff.max()) if diff.size else 0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "differing_pixels_share": float(np.count_nonzero(diff) / diff.size) if diff.size else 0.0,
            "differing_images_share": float(np.count_nonzero(per_image) / len(per_image)) if len(per_image) else 0.0,
            "pixels": int(diff.size), "images": int(len(diff))}


def torchvision_decode(blobs: list, channels: int) -> np.ndarray:
    """The blobs decoded by torchvision's CPU decoders in one batched call (GRAY or RGB)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    tensors = [torch.from_numpy(np.asarray(b, np.uint8).copy()) for b in blobs]
    out = decode_jpeg(tensors, mode=mode)
    stacked = torch.stack(out).permute(0, 2, 3, 1)  # (N, H, W, C)
    return (stacked[..., 0] if channels == 1 else stacked).numpy()


def pixel_tolerance(raw_dir: Path, encoded_dir: Path, workers: int) -> dict:
    """Per split and decoder: the encoded pack decoded, against the raw pack (see the module docstring)."""
    from pipeline.decode import DecodePool, decode_side
    from pipeline.shards import load_manifest, read_split

    manifest = load_manifest(encoded_dir)
    out = {}
    pool = DecodePool(workers)
    try:
        for split, entry in manifest["splits"].items():
            if not entry["count"]:
                continue
            raw = read_split(raw_dir, split, with_ids=True)
            enc = read_split(encoded_dir, split, with_ids=True)
            # Rows matched by id: the two packs write the same seeded order, but nothing here relies on it.
            raw_order = np.argsort(np.array(raw.ids))
            enc_order = np.argsort(np.array(enc.ids))
            if [raw.ids[i] for i in raw_order] != [enc.ids[i] for i in enc_order]:
                raise BadOption(f"{split}: the raw and encoded packs hold different images")
            blobs = enc.encoded.read_all()
            side = decode_side(enc, 48)
            start = time.perf_counter()
            pillow = pool.decode_batch(blobs, enc.channels, side)
            pool_s = time.perf_counter() - start
            torchvision_decode(blobs[:8], enc.channels)  # its first call loads the library: not timed
            start = time.perf_counter()
            tv = torchvision_decode(blobs, enc.channels)
            tv_s = time.perf_counter() - start
            reference = raw.images[raw_order]
            out[split] = {
                "decoder_pool": {**compare(pillow[enc_order], reference), "seconds": pool_s,
                                 "images_per_s": len(blobs) / pool_s, "workers": workers},
                "torchvision_cpu": {**compare(tv[enc_order], reference), "seconds": tv_s,
                                    "images_per_s": len(blobs) / tv_s},
                "labels_equal": bool(np.array_equal(raw.labels[raw_order], enc.labels[enc_order]))}
            enc.encoded.close()
    finally:
        pool.close()
    return out


def run(source: Path, repeats: int, workers: int, json_path: Path) -> dict:
    at_least(1, repeats=repeats, workers=workers)
    check_source(source)
    work = Path(tempfile.mkdtemp(prefix="facesense-bench-storage-"))
    try:
        seconds = time_packs(source, work, ["raw", "encoded"], repeats, None)
        manifests = {s: json.loads((work / s / "manifest.json").read_text()) for s in seconds}
        images = sum(e["count"] for e in manifests["raw"]["splits"].values())
        packs = []
        for store, times in seconds.items():
            median = statistics.median(times)
            packs.append({"store": store, "images": images, "seconds": median, "all_seconds": times,
                          "images_per_s": images / median, "disk_bytes": disk_bytes(work / store),
                          "decoded_bytes": sum(e["decoded_bytes"] for e in manifests[store]["splits"].values())})
        tolerance = pixel_tolerance(work / "raw", work / "encoded", workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = {dec: max(t[dec]["max_abs_diff"] for t in tolerance.values()) for dec in ("decoder_pool", "torchvision_cpu")}
    payload = {"benchmark": "storage", "packs": packs,
               "encoded_over_raw_pack_time": packs[1]["seconds"] / packs[0]["seconds"],
               "pixels_vs_raw": tolerance, "max_abs_diff": worst,
               "config": {"source": str(source), "repeats": repeats, "decode_workers": workers,
                          "note": "packs take turns after one untimed round; pack workers: all cores"}}
    write_result(json_path, payload)
    for p in packs:
        print(f"pack --store {p['store']:8s} {p['images']:6d} images {p['seconds']:6.2f} s {p['images_per_s']:9.0f} "
              f"img/s  {p['disk_bytes'] / 1e6:6.1f} MB on disk")
    for split, t in tolerance.items():
        for dec in ("decoder_pool", "torchvision_cpu"):
            c = t[dec]
            print(f"{split:5s} {dec:15s} max |diff| {c['max_abs_diff']:3d}, {100 * c['differing_pixels_share']:.3f}% "
                  f"of pixels, {100 * c['differing_images_share']:.2f}% of images differ; "
                  f"decode {c['images_per_s']:,.0f} img/s")
    print(f"wrote {json_path}")
    return payload
