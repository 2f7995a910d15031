"""Loader throughput: images/s per loader kind and output size, after warm-up, device synchronised.

Run: facesense bench loader --data data/shards --kinds resident,dali,dataloader \
         --sizes 48,112,224 --batches 20 --batch-size 256 --json benchmarks/results/loader-cpu.json

Each (kind, size) builds a train-mode loader on the split, runs `--warmup` batches,
then `--repeats` timed runs of `--batches` batches each; the median run is reported.
Kinds that cannot run here (e.g. DALI not installed) are recorded as skipped.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.env import write_result
from pipeline.loaders import LoaderConfig, make_loader

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(loader, batches: int, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Images/s of `repeats` timed runs of `batches` batches, cycling epochs as needed."""
    def batch_stream():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batch_stream()
    for _ in range(warmup):
        next(stream)
    _sync(device)
    rates = []
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        for _ in range(batches):
            images, labels = next(stream)
            n += len(labels)
        _sync(device)
        rates.append(n / (time.perf_counter() - start))
    return rates


def run(data: Path, kinds: list[str], sizes: list[int], batches: int, batch_size: int, split: str,
        dtype: str, channels: int, warmup: int, repeats: int, workers: int, device: str,
        json_path: Path) -> dict:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    results = []
    for kind in kinds:
        for size in sizes:
            cfg = LoaderConfig(kind=kind, batch_size=batch_size, img_size=size, channels=channels,
                               dtype=DTYPES[dtype], workers=workers)
            row = {"kind": kind, "size": size, "dtype": dtype, "channels": channels, "batch_size": batch_size}
            try:
                loader = make_loader(data, split, cfg, dev)
            except ImportError as exc:
                results.append({**row, "skipped": str(exc)})
                print(f"{kind:10s} {size:4d}px  skipped: {exc}")
                continue
            rates = time_loader(loader, batches, warmup, repeats, dev)
            results.append({**row, "images_per_s": statistics.median(rates), "all_images_per_s": rates,
                            "engine": getattr(loader, "engine", kind)})
            print(f"{kind:10s} {size:4d}px  {statistics.median(rates):10.0f} img/s")
            del loader
    ratios = {}
    for size in sizes:
        by_kind = {r["kind"]: r.get("images_per_s") for r in results if r["size"] == size}
        base = by_kind.get("dataloader")
        if base:
            ratios[str(size)] = {k: v / base for k, v in by_kind.items() if v and k != "dataloader"}
    payload = {"benchmark": "loader", "results": results, "speedup_vs_dataloader": ratios,
               "config": {"data": str(data), "split": split, "batches": batches, "batch_size": batch_size,
                          "warmup": warmup, "repeats": repeats, "workers": workers, "device": str(dev),
                          "torch_threads": torch.get_num_threads()}}
    write_result(json_path, payload)
    print(f"speed-up over dataloader: {ratios}\nwrote {json_path}")
    return payload
