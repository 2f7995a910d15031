"""Training throughput: the training step with everything else stripped out.

Run: facesense bench train --data data/shards --sizes 48,112,224 --json benchmarks/results/train-cpu.json

Per image size:
* `synthetic`: the model step alone on random data already on the device (the ceiling),
  for each variant in --variants (eager|compiled x fp32|amp x nchw|cl);
* `end_to_end`: real shards through each loader in --loaders, with the first variant
  (the one training uses by default on this device).
Warm-up steps first (they include compilation; their time is reported apart as
`warmup_s`), then --repeats timed runs of --steps steps, synchronised; the median run
is reported. Each compiled variant starts from a reset dynamo state. The step is facesense train's:
model from facesense.core.model, AdamW from facesense.train.optim, AMP from facesense.core.runtime.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.env import CPU_ENGINES, loader_stream, resolve_device, timed_runs, write_result
from facesense.core.config import TrainConfig
from facesense.core.model import create_model
from facesense.train.optim import make_optimizer
from facesense.core.runtime import amp_setup
from pipeline.loaders import LoaderConfig, make_loader
from pipeline.shards import load_manifest


# What --variants is when not given, per device: the first is what `facesense train` runs there by default.
DEFAULT_VARIANTS = {"cuda": ("compiled-amp-cl", "eager-amp-cl", "compiled-fp32-cl", "compiled-amp-nchw"),
                    "cpu": ("eager-fp32-cl", "eager-fp32-nchw", "eager-amp-cl")}


def default_variants(device: torch.device) -> list[str]:
    return list(DEFAULT_VARIANTS["cuda" if device.type == "cuda" else "cpu"])


def parse_variant(name: str) -> dict:
    parts = name.split("-")
    if len(parts) != 3 or parts[0] not in ("eager", "compiled") or parts[1] not in ("fp32", "amp") \
            or parts[2] not in ("nchw", "cl"):
        raise ValueError(f"variant {name!r}: expected eager|compiled-fp32|amp-nchw|cl, e.g. eager-fp32-cl")
    return {"compile": parts[0] == "compiled", "amp": parts[1] == "amp", "channels_last": parts[2] == "cl"}


class Step:
    """One training step of `model_name` for a variant, on `device`."""

    def __init__(self, model_name: str, num_classes: int, channels: int, variant: dict, device: torch.device):
        fmt = torch.channels_last if variant["channels_last"] else torch.contiguous_format
        self.model = create_model(model_name, channels, num_classes, zero_init=True).to(device, memory_format=fmt)
        self.optimizer = make_optimizer(self.model, TrainConfig(), device)
        self.autocast, self.scaler, self.batch_dtype = amp_setup(variant["amp"], "bfloat16", device)
        if variant["compile"]:
            # A fresh dynamo state per variant: otherwise guards and graphs from the previous size or
            # variant linger, recompiles pile up to the cache limit and the step may run a dynamic-shape
            # graph, which is not what a training run (one size, compiled once) executes.
            torch._dynamo.reset()
        self.forward = torch.compile(self.model) if variant["compile"] else self.model
        self.format = fmt

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with self.autocast:
            loss = F.cross_entropy(self.forward(images.contiguous(memory_format=self.format)), labels,
                                   label_smoothing=0.1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _time(step: Step, batches, steps: int, warmup: int, repeats: int, batch_size: int,
          device: torch.device) -> tuple[list[float], float]:
    """Images/s of each timed repeat, and the warm-up's seconds (which include any compilation)."""
    def take(n: int):
        return lambda: [step(*next(batches)) for _ in range(n)]

    warmup_s = timed_runs(take(warmup), 1, 0, device)[0]
    return [steps * batch_size / s for s in timed_runs(take(steps), repeats, 0, device)], warmup_s


def run(data: Path, sizes: list[int], variants: list[str], loaders: list[str], model: str, channels: int,
        batch_size: int, steps: int, warmup: int, repeats: int, device: str, json_path: Path,
        cpu_augment: str | None = None) -> dict:
    """`variants` empty: DEFAULT_VARIANTS for the device. `cpu_augment` (compiled | reference): the resident
    loader's engine on a CPU end to end; None: compiled exactly when the first variant is."""
    if cpu_augment is not None and cpu_augment not in CPU_ENGINES:
        raise ValueError(f"cpu augment {cpu_augment!r}: expected one of {', '.join(CPU_ENGINES)}")
    dev = resolve_device(device)
    variants = list(variants) or default_variants(dev)
    parsed = {v: parse_variant(v) for v in variants}
    classes = load_manifest(data)["classes"]
    results = []

    def record(row: dict, timed: tuple[list[float], float]) -> None:
        rates, warmup_s = timed
        row.update(images_per_s=statistics.median(rates), all_images_per_s=rates, warmup_s=warmup_s)
        results.append(row)
        print(f"{row['size']:4d}px {row['mode']:10s} {row['loader']:10s} {row['variant']:18s} "
              f"{row['images_per_s']:9.1f} img/s")

    for size in sizes:
        first = None  # the first variant's step: end to end reuses it, so it is compiled once per size
        for name, variant in parsed.items():
            torch.manual_seed(0)
            step = Step(model, len(classes), channels, variant, dev)
            fixed = (torch.randn(batch_size, channels, size, size, device=dev),
                     torch.randint(0, len(classes), (batch_size,), device=dev))
            fixed = (fixed[0].to(step.batch_dtype), fixed[1])  # what the loader hands training under AMP
            timed = _time(step, iter(lambda: fixed, None), steps, warmup, repeats, batch_size, dev)
            record({"size": size, "mode": "synthetic", "loader": "none", "variant": name}, timed)
            first = first or step
        name, variant = variants[0], parsed[variants[0]]
        for kind in loaders:
            cfg = LoaderConfig(kind=kind, batch_size=batch_size, img_size=size, channels=channels,
                               dtype=first.batch_dtype,
                               compile_cpu=variant["compile"] if cpu_augment is None else CPU_ENGINES[cpu_augment])
            try:
                loader = make_loader(data, "train", cfg, dev)
            except ImportError as exc:
                results.append({"size": size, "mode": "end_to_end", "loader": kind, "variant": name,
                                "skipped": str(exc)})
                continue
            timed = _time(first, loader_stream(loader), steps, warmup, repeats, batch_size, dev)
            record({"size": size, "mode": "end_to_end", "loader": kind, "resolved_loader": loader.kind,
                    "engine": getattr(loader, "engine", kind), "variant": name}, timed)
            del loader
    ratios = {}
    for size in sizes:
        ceiling = next(r["images_per_s"] for r in results if r["size"] == size and r["mode"] == "synthetic"
                       and r["variant"] == variants[0])
        ratios[str(size)] = {r["loader"]: r["images_per_s"] / ceiling for r in results
                             if r["size"] == size and r["mode"] == "end_to_end" and "images_per_s" in r}
    payload = {"benchmark": "train", "results": results, "end_to_end_over_ceiling": ratios,
               "config": {"data": str(data), "model": model, "channels": channels, "batch_size": batch_size,
                          "steps": steps, "warmup": warmup, "repeats": repeats, "variants": variants,
                          "loaders": loaders, "cpu_augment": cpu_augment, "device": str(dev),
                          "torch_threads": torch.get_num_threads()}}
    write_result(json_path, payload)
    print(f"end-to-end / ceiling: {ratios}\nwrote {json_path}")
    return payload
