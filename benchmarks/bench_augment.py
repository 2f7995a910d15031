"""Augmentation throughput: pure-torch reference vs the fused Triton kernel, images/s.

Run: facesense bench augment --device cuda --sizes 48,112,224 --dtypes float16,bfloat16 \
         --json benchmarks/results/augment-h100.json

Engines get the same data set (synthetic FER2013-sized uint8, resident on the device),
the same indices and the same parameters, already on the device: what is timed is the
augmentation alone. Warm-up (and Triton's compile) runs first; each repeat times
`iters` calls between synchronizes; the median repeat is reported. Triton is timed on
CUDA only: under TRITON_INTERPRET=1 a timing would measure the interpreter.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.env import (BadOption, at_least, check_channels, check_sizes, median_time, resolve_device,
                            torch_dtype, write_result)
from kernels.reference import augment_reference
from kernels.spec import AugConfig, OutputSpec, sample_params


def time_engine(fn, device: torch.device, batch_size: int, warmup: int, repeats: int, iters: int) -> dict:
    """`warmup` untimed calls, then `repeats` timed runs of `iters` calls each; images/s of the median run."""
    def calls():
        for _ in range(iters):
            fn()

    for _ in range(warmup):
        fn()
    median, seconds = median_time(calls, repeats, 0, device)
    return {"images_per_s": batch_size * iters / median, "median_s": median, "repeat_s": seconds}


def triton_engine(device: torch.device):
    """augment_triton where a timing means something (CUDA), else (None, why not)."""
    if device.type != "cuda":
        return None, "triton skipped: timed on CUDA only (on CPU it runs in the interpreter)"
    from kernels.triton_augment import augment_triton, triton_available

    if not triton_available(device):
        return None, "triton skipped: triton is not installed"
    return augment_triton, None


def run(device: str, sizes: list[int], dtypes: list[str], channels: int, batch_size: int, dataset_size: int,
        warmup: int, repeats: int, iters: int, json_path: Path | None, seed: int = 0) -> dict:
    # Every option checked before anything runs (BadOption: a one-line CLI error).
    check_sizes(sizes)
    check_channels(channels)
    at_least(1, batch_size=batch_size, dataset_size=dataset_size, repeats=repeats, iters=iters)
    at_least(0, warmup=warmup)
    if not dtypes:
        raise BadOption("--dtypes: give at least one of float32, float16, bfloat16")
    torch_dtypes = {name: torch_dtype(name) for name in dtypes}
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (dataset_size, 48, 48), dtype=torch.uint8, generator=gen).to(dev)
    index = torch.randint(0, dataset_size, (batch_size,), generator=gen).to(dev)
    params = sample_params(batch_size, AugConfig(erase_p=0.5), gen).to(dev)
    triton_fn, note = triton_engine(dev)
    results = []
    for size in sizes:
        for dtype in dtypes:
            out = OutputSpec(size=size, channels=channels, dtype=torch_dtypes[dtype])
            engines = {"reference": lambda: augment_reference(images, index, params, out)}
            if triton_fn is not None:
                engines["triton"] = lambda: triton_fn(images, index, params, out)
            row = {"size": size, "dtype": dtype, "channels": channels}
            for name, fn in engines.items():
                row[name] = time_engine(fn, dev, batch_size, warmup, repeats, iters)
            if "triton" in row:
                row["triton_over_reference"] = row["triton"]["images_per_s"] / row["reference"]["images_per_s"]
            results.append(row)
            print(f"{size:4d}px {dtype:9s} " + "  ".join(f"{name} {row[name]['images_per_s']:>12,.0f} img/s"
                                                       for name in engines))
    payload = {"benchmark": "augment", "results": results, "notes": [note] if note else [],
               "config": {"device": str(dev), "sizes": sizes, "dtypes": dtypes, "channels": channels,
                          "batch_size": batch_size, "dataset_size": dataset_size, "warmup": warmup,
                          "repeats": repeats, "iters": iters, "seed": seed,
                          "triton_interpret": os.environ.get("TRITON_INTERPRET")}}
    if note:
        print(note)
    if json_path:
        write_result(Path(json_path), payload)
        print(f"wrote {json_path}")
    return payload
