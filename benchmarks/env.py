"""What every benchmark shares: who measured what, the clock, devices and dtypes.

* `environment()` / `write_result()`: machine, versions and git commit, embedded in every
  result file;
* `timed_runs()` / `median_time()`: the clock, with the device synchronised before it is read;
* `BadOption`, `at_least()`, `check_sizes()`, `check_channels()`: an option no benchmark can run with, a
  one-line CLI error raised before anything runs;
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

from facesense.core.errors import FaceSenseError

ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what --dtype / --dtypes accept
# The resident loader's augmentation engines on a CPU (train --cpu-augment), as LoaderConfig.compile_cpu.
CPU_ENGINES = {"compiled": True, "reference": False}
MIN_SIZE, MAX_SIZE = 8, 1024  # image sizes a benchmark takes: train's --img-size range
PACKAGES = ("torch", "torchvision", "triton", "nvidia-dali-cuda130", "timm", "numpy", "h5py", "pillow")


class BadOption(FaceSenseError, ValueError):
    """A benchmark option that cannot work: `error: ...` and exit 1 (the CLI root), raised before any work.
    Also a ValueError, the benchmarks' older way of refusing an option."""


def at_least(minimum: int, **options: int) -> None:
    """Each option (its flag spelt with _ for -) at least `minimum` (0 or 1)."""
    for name, value in options.items():
        if value < minimum:
            flag = "--" + name.replace("_", "-")
            raise BadOption(f"{flag} {value}: must be {'positive' if minimum == 1 else 'zero or more'}")


def check_sizes(sizes: list[int]) -> None:
    """--sizes: one or more, each between MIN_SIZE and MAX_SIZE pixels."""
    if not sizes:
        raise BadOption("--sizes: give at least one size, e.g. 48,112")
    bad = [s for s in sizes if not MIN_SIZE <= s <= MAX_SIZE]
    if bad:
        raise BadOption(f"--sizes {bad[0]}: must be between {MIN_SIZE} and {MAX_SIZE} pixels")


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise BadOption(f"--channels {channels}: expected 1 (gray) or 3 (gray replicated)")


def check_loader_kinds(kinds: list[str], flag: str) -> None:
    from pipeline.loaders import KINDS

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise BadOption(f"{flag} {unknown[0]!r}: expected one or more of {', '.join(KINDS)}")


def check_split(data: Path, split: str, batch_size: int) -> dict:
    """The shards' manifest (ShardError, one line, if there is none), with `split` holding a batch."""
    from pipeline.shards import load_manifest

    manifest = load_manifest(data)
    count = manifest["splits"].get(split, {}).get("count")
    if count is None:
        raise BadOption(f"--split {split!r}: expected one of {', '.join(manifest['splits'])}")
    if count < batch_size:
        raise BadOption(f"--batch-size {batch_size}: more than the {count} images of {data}'s {split} split")
    return manifest


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
    """The torch.device a --device option names: "auto" is CUDA where available, else the CPU; BadOption
    for any other name, or for a CUDA device this machine does not have."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        raise BadOption(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadOption(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise BadOption(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def sync(device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU or for None)."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def torch_dtype(name: str):
    """The torch dtype a --dtype option names; BadOption (a one-line CLI error) for any other name."""
    if name not in DTYPE_NAMES:
        raise BadOption(f"dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
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


def with_train_batch_hook(make_loader, on_batch):
    """`make_loader` whose training loaders pass every batch through `on_batch(loader, n, images, labels)`
    (n counts from 1 across epochs) before the loop gets it: what the restart benchmark and the fault
    tests use to time, poison or kill a run at a known batch. Eval loaders are left alone."""
    def hooked(data, split, cfg, device, *rest):
        loader = make_loader(data, split, cfg, device, *rest)
        if cfg.train:
            inner, handed = type(loader).__iter__, [0]

            def iterate(self):
                for images, labels in inner(self):
                    handed[0] += 1
                    yield on_batch(self, handed[0], images, labels)

            loader.__class__ = type("Hooked" + type(loader).__name__, (type(loader),), {"__iter__": iterate})
        return loader

    return hooked
