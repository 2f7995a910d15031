"""Augmentation throughput: pure-torch reference vs the fused Triton kernel, images/s.

    python -m benchmarks.bench_augment --device cuda --size 224 --batch-size 1024 \
        --dtype float16 --json benchmarks/results/augment_h100.json

Engines get the same data set (synthetic FER2013-sized uint8, resident on the device),
the same indices and the same parameters, already on the device: what is timed is the
augmentation alone. Warm-up (and Triton's compile) runs first; each repeat times
`--iters` calls between synchronizes; the median repeat is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from kernels.reference import augment_reference
from kernels.spec import AugConfig, OutputSpec, sample_params
from kernels.triton_augment import augment_triton, triton_available

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(fn, device, batch_size, warmup, repeats, iters) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"images_per_s": batch_size * iters / median, "median_s": median,
            "repeat_s": seconds}


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=224, help="output side in pixels")
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--dataset-size", type=int, default=28709, help="FER2013 train split")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.dataset_size, 48, 48), dtype=torch.uint8,
                           generator=gen).to(device)
    index = torch.randint(0, args.dataset_size, (args.batch_size,), generator=gen).to(device)
    params = sample_params(args.batch_size, AugConfig(erase_p=0.5), gen).to(device)
    out = OutputSpec(size=args.size, channels=args.channels, dtype=DTYPES[args.dtype])

    engines = {"reference": lambda: augment_reference(images, index, params, out)}
    notes = []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        notes.append("triton skipped: TRITON_INTERPRET=1 timings measure the interpreter")
    elif triton_available(device):
        engines["triton"] = lambda: augment_triton(images, index, params, out)
    else:
        notes.append(f"triton skipped: not available on {device}")

    results = {}
    for name, fn in engines.items():
        results[name] = time_engine(fn, device, args.batch_size, args.warmup, args.repeats,
                                    args.iters)
        print(f"{name:>10}: {results[name]['images_per_s']:>12,.0f} images/s")
    if "triton" in results:
        ratio = results["triton"]["images_per_s"] / results["reference"]["images_per_s"]
        results["triton_over_reference"] = ratio
        print(f"triton / reference: {ratio:.2f}x")
    for note in notes:
        print(note)

    record = {"benchmark": "augment", "results": results, "notes": notes,
              "machine": machine(device), "versions": versions(), "config": vars(args),
              "git_commit": git_commit()}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
