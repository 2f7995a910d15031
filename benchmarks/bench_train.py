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

DDP (the GPU check's ddp part): the synthetic step on every rank of a torchrun launch,

    python -m torch.distributed.run --standalone --nproc_per_node N -m benchmarks.bench_train \
        --size 224 --variant eager-amp-cl --model efficientnet_b0 --batch-size 256 --json ROW.json

each rank on its own GPU with its own --batch-size, the model wrapped in DistributedDataParallel as
facesense train wraps it (one process: no wrapper, as train runs on one device). A repeat's time is
the slowest rank's; images/s counts the batches of every rank. Rank 0 writes the row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.env import (CPU_ENGINES, BadOption, at_least, check_channels, check_loader_kinds, check_sizes,
                            check_split, loader_stream, resolve_device, timed_runs, write_result)
from facesense.core.config import TrainConfig
from facesense.core.model import create_model
from facesense.train.optim import make_optimizer
from facesense.core.runtime import amp_setup
from pipeline.loaders import LoaderConfig, make_loader


# What --variants is when not given, per device: the first is what `facesense train` runs there by default.
DEFAULT_VARIANTS = {"cuda": ("compiled-amp-cl", "eager-amp-cl", "compiled-fp32-cl", "compiled-amp-nchw"),
                    "cpu": ("eager-fp32-cl", "eager-fp32-nchw", "eager-amp-cl")}


def default_variants(device: torch.device) -> list[str]:
    return list(DEFAULT_VARIANTS["cuda" if device.type == "cuda" else "cpu"])


def parse_variant(name: str) -> dict:
    parts = name.split("-")
    if len(parts) != 3 or parts[0] not in ("eager", "compiled") or parts[1] not in ("fp32", "amp") \
            or parts[2] not in ("nchw", "cl"):
        raise BadOption(f"variant {name!r}: expected eager|compiled-fp32|amp-nchw|cl, e.g. eager-fp32-cl")
    return {"compile": parts[0] == "compiled", "amp": parts[1] == "amp", "channels_last": parts[2] == "cl"}


def check_model(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise BadOption(f"--model {name!r}: not a timm model (list them with timm.list_models())")


class Step:
    """One training step of `model_name` for a variant, on `device`."""

    def __init__(self, model_name: str, num_classes: int, channels: int, variant: dict, device: torch.device,
                 distributed: bool = False):
        """`distributed`: in a process group (torchrun), the model wrapped in DDP as facesense train does."""
        fmt = torch.channels_last if variant["channels_last"] else torch.contiguous_format
        self.model = create_model(model_name, channels, num_classes, zero_init=True).to(device, memory_format=fmt)
        self.optimizer = make_optimizer(self.model, TrainConfig(), device)
        self.autocast, self.scaler, self.batch_dtype = amp_setup(variant["amp"], "bfloat16", device)
        runner = self.model
        if distributed:
            runner = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        if variant["compile"]:
            # A fresh dynamo state per variant: otherwise guards and graphs from the previous size or
            # variant linger, recompiles pile up to the cache limit and the step may run a dynamic-shape
            # graph, which is not what a training run (one size, compiled once) executes.
            torch._dynamo.reset()
        self.forward = torch.compile(runner) if variant["compile"] else runner
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
    # Every option checked before anything runs (BadOption: a one-line CLI error).
    check_model(model)
    check_sizes(sizes)
    check_loader_kinds(loaders, "--loaders")
    check_channels(channels)
    at_least(1, batch_size=batch_size, steps=steps, repeats=repeats)
    at_least(0, warmup=warmup)
    if cpu_augment is not None and cpu_augment not in CPU_ENGINES:
        raise BadOption(f"cpu augment {cpu_augment!r}: expected one of {', '.join(CPU_ENGINES)}")
    parsed = {v: parse_variant(v) for v in variants}
    dev = resolve_device(device)
    variants = list(variants) or default_variants(dev)
    parsed = parsed or {v: parse_variant(v) for v in variants}
    classes = check_split(data, "train", batch_size if loaders else 0)["classes"]
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


# --------------------------------------------------------------------------------------
# DDP: one rank of a torchrun launch (see the module docstring)
# --------------------------------------------------------------------------------------

def ddp_synthetic(size: int, variant: str, model: str, channels: int, batch_size: int, steps: int, warmup: int,
                  repeats: int, device: str, num_classes: int = 7) -> dict | None:
    """This rank's share of a DDP timing of the synthetic step; the row on rank 0, None on the others."""
    import torch.distributed as dist

    from facesense.core import runtime

    check_model(model)
    check_sizes([size])
    check_channels(channels)
    at_least(1, batch_size=batch_size, steps=steps, repeats=repeats)
    at_least(0, warmup=warmup)
    parsed = parse_variant(variant)
    rt = runtime.setup(device, deterministic=False)  # under torchrun with N > 1: joins the process group
    try:
        torch.manual_seed(0)  # the same weights on every rank (DDP also broadcasts rank 0's)
        step = Step(model, num_classes, channels, parsed, rt.device, distributed=rt.distributed)
        fixed = (torch.randn(batch_size, channels, size, size, device=rt.device).to(step.batch_dtype),
                 torch.randint(0, num_classes, (batch_size,), device=rt.device))

        def take(n: int):
            return lambda: [step(*fixed) for _ in range(n)]

        warmup_s = timed_runs(take(warmup), 1, 0, rt.device)[0]
        if rt.distributed:
            dist.barrier()  # every rank warm (compiled, autotuned) before the clock starts
        seconds = timed_runs(take(steps), repeats, 0, rt.device) + [warmup_s]
        if rt.distributed:  # each repeat lasts as long as its slowest rank
            slowest = torch.tensor(seconds, dtype=torch.float64, device=rt.device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = slowest.tolist()
        if not rt.is_main:
            return None
        *seconds, warmup_s = seconds
        rates = [rt.world_size * steps * batch_size / s for s in seconds]
        total = statistics.median(rates)
        return {"size": size, "gpus": rt.world_size, "images_per_s": total,
                "images_per_s_per_gpu": total / rt.world_size, "all_images_per_s": rates, "warmup_s": warmup_s, "ddp": rt.distributed, "variant": variant,
                "model": model, "batch_size_per_gpu": batch_size, "steps": steps, "device": rt.device.type}
    finally:
        runtime.teardown(rt)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m torch.distributed.run --standalone --nproc_per_node N -m benchmarks.bench_train",
        description="DDP images/s of the synthetic training step, every rank together (rank 0 writes --json).")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--variant", default="eager-amp-cl")
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (rank r on cuda:LOCAL_RANK) or cpu (gloo)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    row = ddp_synthetic(args.size, args.variant, args.model, args.channels, args.batch_size, args.steps,
                        args.warmup, args.repeats, args.device)
    if row is not None:
        args.json.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{row['size']}px, {row['gpus']} process(es): {row['images_per_s']:.1f} img/s "
              f"({row['images_per_s_per_gpu']:.1f} per GPU)")


if __name__ == "__main__":
    main(sys.argv[1:])
