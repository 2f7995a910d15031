"""Loader throughput: images/s per loader kind and output size, after warm-up, device synchronised.

Run: facesense bench loader --data data/shards --kinds resident,dali,dataloader \
         --sizes 48,112,224 --batches 20 --batch-size 256 --json benchmarks/results/loader-cpu.json

Each (kind, size) builds a train-mode loader on the split, runs `--warmup` batches (the
first timed apart as `first_batch_s`: it holds any compilation), then `--repeats` timed
runs of `--batches` batches each; the median run is reported. Kinds that cannot run here
(e.g. DALI not installed) are recorded as skipped.

The resident loader on a CPU has two augmentation engines (`--cpu-engines`): `compiled`
(kernels/cpu_fused.py, torch.compile; LoaderConfig(compile_cpu=True)) and `reference`
(the pure-torch definition, eager). With more than one, each (kind, size) builds one loader
per engine and takes their timed runs in turns (A B A B ...), so that a noisy neighbour
slows every engine alike; `cpu_engine_ratios` holds their images/s ratios. `one_time_s` is
the first batch's seconds less a steady batch's: the compile, for the compiled engine (the
first size in a process also pays inductor's start-up; TORCHINDUCTOR_CACHE_DIR, recorded in
the config, says which compile cache it could use).
"""
from __future__ import annotations

import itertools
import os
import statistics
from pathlib import Path

import torch

from benchmarks.env import (CPU_ENGINES, BadOption, at_least, check_channels, check_loader_kinds, check_sizes,
                            check_split, loader_stream, resolve_device, timed_runs, torch_dtype, write_result)
from pipeline.loaders import LoaderConfig, make_loader, resolve_kind


def time_loaders(loaders: dict, batches: int, warmup: int, repeats: int, device: torch.device) -> dict:
    """Per loader: {"first_batch_s", "rates"}: the first warm-up batch's seconds (None without warm-up),
    and the images/s of `repeats` timed runs of `batches` batches, the loaders taking turns per run."""
    timings = {}
    for name, loader in loaders.items():
        stream = loader_stream(loader)
        first = timed_runs(lambda: next(stream), 1, 0, device)[0] if warmup else None
        timed_runs(lambda: next(stream), 0, warmup - 1, device)
        timings[name] = {"stream": stream, "first_batch_s": first, "rates": []}
    for _ in range(repeats):
        for timing in timings.values():
            counted = []

            def read_batches():
                counted.extend(len(next(timing["stream"])[1]) for _ in range(batches))

            seconds = timed_runs(read_batches, 1, 0, device)[0]
            timing["rates"].append(sum(counted) / seconds)
    return {name: {"first_batch_s": t["first_batch_s"], "rates": t["rates"]} for name, t in timings.items()}


def run(data: Path, kinds: list[str], sizes: list[int], batches: int, batch_size: int, split: str,
        dtype: str, channels: int, warmup: int, repeats: int, workers: int, device: str,
        json_path: Path, cpu_engines: list[str] = ("compiled",)) -> dict:
    # Every option checked before anything runs (BadOption: a one-line CLI error).
    if not kinds:
        raise BadOption("--kinds: give at least one loader kind, e.g. resident")
    check_loader_kinds(kinds, "--kinds")
    check_sizes(sizes)
    check_channels(channels)
    at_least(1, batches=batches, batch_size=batch_size, repeats=repeats)
    at_least(0, warmup=warmup, workers=workers)
    out_dtype = torch_dtype(dtype)
    unknown = [e for e in cpu_engines if e not in CPU_ENGINES]
    if unknown or not cpu_engines:
        raise BadOption(f"cpu engine(s) {unknown}: expected one or more of {', '.join(CPU_ENGINES)}")
    dev = resolve_device(device)
    manifest = check_split(data, split, batch_size)
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # None: inductor's default; read before it sets one
    results, engine_ratios = [], {}
    for kind in kinds:
        engines = list(cpu_engines) if dev.type == "cpu" and resolve_kind(kind, dev) == "resident" else [None]
        for size in sizes:
            row = {"kind": kind, "size": size, "dtype": dtype, "channels": channels, "batch_size": batch_size}
            try:
                loaders = {engine: make_loader(data, split, LoaderConfig(
                    kind=kind, batch_size=batch_size, img_size=size, channels=channels, dtype=out_dtype,
                    workers=workers, compile_cpu=CPU_ENGINES.get(engine, True)), dev, manifest=manifest)
                    for engine in engines}
            except ImportError as exc:
                results.append({**row, "skipped": str(exc)})
                print(f"{kind:10s} {size:4d}px  skipped: {exc}")
                continue
            timings = time_loaders(loaders, batches, warmup, repeats, dev)
            rates = {}
            for engine, loader in loaders.items():
                timing = timings[engine]
                rates[engine] = statistics.median(timing["rates"])
                steady_s = batch_size / rates[engine]
                first_s = timing["first_batch_s"]
                results.append({**row, **({"cpu_engine": engine} if engine else {}),
                                "images_per_s": rates[engine], "all_images_per_s": timing["rates"],
                                "engine": getattr(loader, "engine", kind), "first_batch_s": first_s,
                                "one_time_s": None if first_s is None else max(0.0, first_s - steady_s)})
                print(f"{kind:10s} {size:4d}px {results[-1]['engine']:18s} {rates[engine]:10.0f} img/s"
                      + ("" if first_s is None else f"  (first batch {first_s:.2f} s)"))
            if len(rates) > 1:
                engine_ratios.setdefault(kind, {})[str(size)] = {
                    f"{a}/{b}": rates[a] / rates[b] for a, b in itertools.combinations(rates, 2)}
            del loaders
    ratios = {}
    for size in sizes:  # a kind's first engine stands for it
        by_kind = {}
        for r in results:
            if r["size"] == size:
                by_kind.setdefault(r["kind"], r.get("images_per_s"))
        base = by_kind.get("dataloader")
        if base:
            ratios[str(size)] = {k: v / base for k, v in by_kind.items() if v and k != "dataloader"}
    payload = {"benchmark": "loader", "results": results, "speedup_vs_dataloader": ratios,
               **({"cpu_engine_ratios": engine_ratios} if engine_ratios else {}),
               "config": {"data": str(data), "split": split, "batches": batches, "batch_size": batch_size,
                          "warmup": warmup, "repeats": repeats, "workers": workers, "device": str(dev),
                          "cpu_engines": list(cpu_engines), "torch_threads": torch.get_num_threads(),
                          "inductor_cache_dir": cache_dir}}
    write_result(json_path, payload)
    if engine_ratios:
        print(f"cpu engines: {engine_ratios}")
    print(f"speed-up over dataloader: {ratios}\nwrote {json_path}")
    return payload

