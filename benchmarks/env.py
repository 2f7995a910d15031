"""What every benchmark shares: who measured what, the clock, devices and dtypes.

* `environment()` / `write_result()`: machine, versions and git commit, embedded in every
  result file;
* `timed_runs()` / `median_time()`: the clock, with the device synchronised before it is read;
* `resolve_device()`, `sync()`, `torch_dtype()`, `CPU_ENGINES`: what a `--device`, `--dtype` or
  `--cpu-engines` / `--cpu-augment` option names;
* `loader_stream()`: a loader's batches epoch after epoch, for as many batches as a timing takes;
* `ROOT`, `child_env()`: the source tree, and the environment a benchmark child process runs in.

torch is imported where it is used, not here: `bench pack` times packing without it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what --dtype / --dtypes accept
# The resident loader's augmentation engines on a CPU (train --cpu-augment), as LoaderConfig.compile_cpu.
CPU_ENGINES = {"compiled": True, "reference": False}
PACKAGES = ("torch", "torchvision", "triton", "nvidia-dali-cuda130", "timm", "numpy", "h5py", "pillow")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True, timeout=20).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = driver = cuda = None
    try:
        import torch

        cuda = torch.version.cuda
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
            driver = _nvidia_smi("driver_version")
    except ImportError:
        pass
    return {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "gpu_driver": driver, "cuda": cuda,
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def resolve_device(name: str):
    """The torch.device a --device option names: "auto" is CUDA where available, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU or for None)."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def torch_dtype(name: str):
    """The torch dtype a --dtype option names; ValueError (a one-line CLI error) for any other name."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def timed_runs(fn, repeats: int, warmup: int = 0, device=None) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls; `device` is synchronised
    before the clock starts and before it is read, so queued GPU work is counted where it was queued."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, repeats: int, warmup: int = 1, device=None) -> tuple[float, list[float]]:
    """Run fn warmup times untimed, then `repeats` timed; return (median seconds, all)."""
    times = timed_runs(fn, repeats, warmup, device)
    return statistics.median(times), times


def loader_stream(loader):
    """The loader's batches without end: epoch 0, 1, 2, ... (each epoch set before it is read)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def child_env() -> dict:
    """os.environ with the source tree first on PYTHONPATH: a child process imports this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_result(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, **environment()}, indent=1) + "\n")
