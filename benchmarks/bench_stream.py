"""Encoded shards through the loaders (issue 16): the stream loader against the training step's ceiling,
and every loader on colour 100x100 data against the seed-style dataloader.

    facesense bench stream --source ../shared/fer2013 --size 48 --json benchmarks/results/stream-cpu.json
    facesense bench colour --data data/shards --sizes 112,224 --json benchmarks/results/colour-cpu.json

`bench stream`: FER2013 packed `--store raw` and `--store encoded` (into a temporary folder); one
training step (bench_train.Step, what facesense train runs) is timed on a synthetic batch already on the
device (the ceiling) and end to end through `--loader stream` (with each --decode-threads decoder
pool size; and auto) on the encoded pack and `resident` on the raw pack. The sources take turns per timed repeat (synthetic, stream, ...), so the
machine's noise falls on all of them alike; `end_to_end_over_ceiling` is each loader's median over the
ceiling's median, `paired_ratio_median` the median of the per-round ratios. Between its turns a
loader's background work is paused (benchmarks/turns.py).

`bench colour`: a RAF-DB-layout set of 100x100 colour JPEGs made from FER2013 faces
(benchmarks/colour_set.py) is packed (`--store encoded` by default) and each loader kind's images/s
alone (no model) is timed per output size;
`speedup_vs_dataloader` is each kind over `dataloader` (torch DataLoader + PIL per image, the seed
project's path) on the same data; the kinds take turns too.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.env import (BadOption, at_least, check_loader_kinds, check_sizes, resolve_device, timed_runs,
                            write_result)
from benchmarks.turns import Turn


class Fixed:
    """The synthetic source: one batch already on the device, every time (nothing to pause)."""

    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch

    def pause(self) -> None:
        pass

    def close(self) -> None:
        pass


def time_in_turns(step, sources: dict, steps: int, warmup: int, repeats: int, batch_size: int,
                  device: torch.device) -> dict:
    """Per source (a Fixed or a turns.Turn): `warmup` untimed steps (their seconds kept), then `repeats`
    timed runs of `steps` steps each, the sources taking turns per run and paused between turns."""
    def take(source, n: int):
        return lambda: [step(*source.next()) for _ in range(n)]

    out = {}
    for name, source in sources.items():
        out[name] = {"warmup_s": timed_runs(take(source, warmup), 1, 0, device)[0] if warmup else None,
                     "rates": []}
        source.pause()
    for _ in range(repeats):
        for name, source in sources.items():
            seconds = timed_runs(take(source, steps), 1, 0, device)[0]
            source.pause()  # after the clock: its background work stops until its next turn
            out[name]["rates"].append(steps * batch_size / seconds)
    return out


def time_loader_turns(turns: dict, batches: int, warmup: int, repeats: int, device: torch.device) -> dict:
    """Per loader (a turns.Turn): the first warm-up batch's seconds, and the images/s of `repeats` timed
    runs of `batches` batches, the loaders taking turns per run and paused between turns."""
    out = {}
    for name, turn in turns.items():
        first = timed_runs(turn.next, 1, 0, device)[0] if warmup else None
        timed_runs(turn.next, 0, warmup - 1, device)
        turn.pause()
        out[name] = {"first_batch_s": first, "rates": []}
    for _ in range(repeats):
        for name, turn in turns.items():
            counted = []
            seconds = timed_runs(lambda: counted.extend(len(turn.next()[1]) for _ in range(batches)), 1, 0,
                                 device)[0]
            turn.pause()
            out[name]["rates"].append(sum(counted) / seconds)
    return out


def pack_fer(source: Path, work: Path) -> dict:
    """FER2013 packed raw and encoded under `work`; each pack's seconds."""
    from benchmarks.bench_storage import pack_into

    seconds = {}
    for store in ("raw", "encoded"):
        start = time.perf_counter()
        pack_into(source, work / store, store)
        seconds[store] = time.perf_counter() - start
    return seconds


def end_to_end(sources: dict, size: int, model: str, variant: str, channels: int, batch_size: int, steps: int,
               warmup: int, repeats: int, dev: torch.device, workers: int) -> dict:
    """The ceiling and each (name: (data dir, loader kind[, workers])) of `sources` end to end, in turns, at
    `size`: {"rows", "end_to_end_over_ceiling", "paired_ratio_median", "describe"}."""
    from benchmarks.bench_train import Step, parse_variant
    from pipeline.loaders import LoaderConfig, make_loader
    from pipeline.shards import load_manifest

    first = next(iter(sources.values()))[0]
    classes = load_manifest(first)["classes"]
    torch.manual_seed(0)
    parsed = parse_variant(variant)
    step = Step(model, len(classes), channels, parsed, dev)
    fixed = (torch.randn(batch_size, channels, size, size, device=dev).to(step.batch_dtype),
             torch.randint(0, len(classes), (batch_size,), device=dev))
    streams, loaders, describe = {"synthetic": Fixed(fixed)}, {}, {}
    for name, (data, kind, *threads) in sources.items():
        cfg = LoaderConfig(kind=kind, batch_size=batch_size, img_size=size, channels=channels,
                           dtype=step.batch_dtype, workers=threads[0] if threads else workers, compile_cpu=True)
        loader = loaders[name] = make_loader(data, "train", cfg, dev)
        describe[name] = loader.describe()
        streams[name] = Turn(loader)
    try:
        timed = time_in_turns(step, streams, steps, warmup, repeats, batch_size, dev)
    finally:
        for source in streams.values():
            source.close()
    ceiling = statistics.median(timed["synthetic"]["rates"])
    rows, ratios, paired = [], {}, {}
    for name, t in timed.items():
        rate = statistics.median(t["rates"])
        row = {"size": size, "source": name, "images_per_s": rate, "all_images_per_s": t["rates"],
               "warmup_s": t["warmup_s"], "variant": variant, "model": model}
        if name != "synthetic":
            data, kind, *threads = sources[name]
            row.update(data=str(data), loader=kind, workers=threads[0] if threads else workers,
                       resolved_loader=loaders[name].kind,
                       engine=getattr(loaders[name], "engine", kind), describe=describe[name])
            ratios[name] = rate / ceiling
            paired[name] = statistics.median(a / b for a, b in zip(t["rates"], timed["synthetic"]["rates"]))
        rows.append(row)
    return {"rows": rows, "end_to_end_over_ceiling": ratios, "paired_ratio_median": paired, "describe": describe}


STREAM_TARGET = 0.9  # issue 16: --loader stream end to end at 48 px on the encoded FER2013 pack, CPU


def stream_name(threads: int) -> str:
    return f"stream (encoded, {threads} decoder thread{'s' if threads > 1 else ''})"


def run_stream(source: Path, size: int, model: str, variant: str, channels: int, batch_size: int, steps: int,
               warmup: int, repeats: int, device: str, decode_threads: list[int], json_path: Path) -> dict:
    """`decode_threads`: the stream loader's decoder pool sizes to time (LoaderConfig.workers); the first
    is the one the target is read on (2: facesense train's default --workers)."""
    from benchmarks.bench_storage import check_source
    from benchmarks.bench_train import check_model, default_variants, parse_variant

    check_model(model)
    check_sizes([size])
    if not decode_threads:
        raise BadOption("--decode-threads: give at least one thread count, e.g. 2,1")
    at_least(1, batch_size=batch_size, steps=steps, repeats=repeats, decode_threads=min(decode_threads))
    at_least(0, warmup=warmup)
    check_source(source)
    dev = resolve_device(device)
    variant = variant or default_variants(dev)[0]
    parse_variant(variant)
    work = Path(tempfile.mkdtemp(prefix="facesense-bench-stream-"))
    try:
        pack_s = pack_fer(source, work)
        sources = {stream_name(t): (work / "encoded", "stream", t) for t in decode_threads}
        sources.update({"auto (encoded)": (work / "encoded", "auto", decode_threads[0]),
                        "resident (raw)": (work / "raw", "resident", decode_threads[0])})
        result = end_to_end(sources, size, model, variant, channels, batch_size, steps, warmup, repeats, dev,
                            decode_threads[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    main = stream_name(decode_threads[0])
    value = result["end_to_end_over_ceiling"][main]
    payload = {"benchmark": "stream", "results": result["rows"],
               "end_to_end_over_ceiling": result["end_to_end_over_ceiling"],
               "paired_ratio_median": result["paired_ratio_median"],
               "target": {"what": f"{main} end to end / ceiling", "value": value, "target": STREAM_TARGET,
                          "met": value >= STREAM_TARGET},
               "config": {"source": str(source), "size": size, "model": model, "variant": variant, "channels": channels,
                          "batch_size": batch_size, "steps": steps, "warmup": warmup, "repeats": repeats,
                          "decode_threads": decode_threads, "device": str(dev),
                          "torch_threads": torch.get_num_threads(), "pack_seconds": pack_s}}
    write_result(json_path, payload)
    for row in result["rows"]:
        print(f"{row['size']:4d}px {row['source']:36s} {row['images_per_s']:9.1f} img/s")
    for name, line in result["describe"].items():
        print(f"  {name}: {line}")
    print(f"end to end / ceiling: {result['end_to_end_over_ceiling']}\nwrote {json_path}")
    return payload


# --------------------------------------------------------------------------------------
# bench colour: loaders alone on a 100x100 colour RAF-layout set
# --------------------------------------------------------------------------------------

COLOUR_TARGET = 5.0  # issue 16: resident and stream >= 5x the dataloader at 112 and 224 px, CPU


def pack_colour_set(data: Path, work: Path, images: int, store: str, repeat: int = 1) -> tuple[Path, dict]:
    """The RAF-layout set made from `data`'s faces and packed with `--store store`: (pack dir, what was made)."""
    from benchmarks.bench_storage import pack_into
    from benchmarks.colour_set import make_raf_set

    start = time.perf_counter()
    made = make_raf_set(data, work / "raf", images, repeat=repeat)
    made["make_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    pack_into(work / "raf", work / f"pack-{store}", store)
    made["pack_seconds"] = time.perf_counter() - start
    made["pack_images_per_s"] = made["images"] / made["pack_seconds"]
    shutil.rmtree(work / "raf")  # the shards hold every byte now
    return work / f"pack-{store}", made


def check_faces(data: Path, images: int) -> None:
    from pipeline.shards import load_manifest

    manifest = load_manifest(data)  # ShardError (one line) without one
    have = sum(e["count"] for e in manifest["splits"].values())
    if have < images:
        raise BadOption(f"--images {images}: more than the {have} faces of {data}")
    if any(e["storage"] != "raw" for e in manifest["splits"].values() if e["count"]):
        raise BadOption(f"--data {data}: encoded shards; give raw FER2013 shards (facesense pack --store raw)")


def run_colour(data: Path, images: int, store: str, kinds: list[str], sizes: list[int], batches: int,
               batch_size: int, warmup: int, repeats: int, workers: int, device: str, json_path: Path) -> dict:
    """Per size, every kind's loader is built and warmed, then they take turns (benchmarks/turns.py)."""
    from pipeline.loaders import LoaderConfig, make_loader

    if not kinds:
        raise BadOption("--kinds: give at least one loader kind, e.g. resident,stream,dataloader")
    check_loader_kinds(kinds, "--kinds")
    check_sizes(sizes)
    if store not in ("raw", "encoded"):
        raise BadOption(f"--store {store!r}: expected raw or encoded")
    at_least(1, images=images, batches=batches, batch_size=batch_size, repeats=repeats)
    at_least(0, warmup=warmup, workers=workers)
    dev = resolve_device(device)
    check_faces(data, images)
    work = Path(tempfile.mkdtemp(prefix="facesense-bench-colour-"))
    results, ratios = [], {}
    try:
        shards, made = pack_colour_set(data, work, images, store)
        for size in sizes:
            turns = {}
            try:
                for kind in kinds:
                    cfg = LoaderConfig(kind=kind, batch_size=batch_size, img_size=size, channels=3, workers=workers)
                    try:
                        turns[kind] = Turn(make_loader(shards, "train", cfg, dev))
                    except ImportError as exc:
                        results.append({"kind": kind, "size": size, "skipped": str(exc)})
                timings = time_loader_turns(turns, batches, warmup, repeats, dev)
            finally:
                for turn in turns.values():
                    turn.close()
            rates = {}
            for kind, turn in turns.items():
                loader, timing = turn.loader, timings[kind]
                rates[kind] = statistics.median(timing["rates"])
                results.append({"kind": kind, "size": size, "resolved_kind": loader.kind,
                                "engine": getattr(loader, "engine", kind), "images_per_s": rates[kind],
                                "all_images_per_s": timing["rates"], "first_batch_s": timing["first_batch_s"],
                                "describe": loader.describe()})
                print(f"{kind:10s} {size:4d}px {rates[kind]:10.0f} img/s  ({loader.describe()})", flush=True)
            del turns
            if rates.get("dataloader"):
                ratios[str(size)] = {k: v / rates["dataloader"] for k, v in rates.items() if k != "dataloader"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = {size: {k: {"value": r[k], "target": COLOUR_TARGET, "met": r[k] >= COLOUR_TARGET}
                      for k in ("resident", "stream") if k in r} for size, r in ratios.items()}
    payload = {"benchmark": "colour", "data_set": made, "results": results, "speedup_vs_dataloader": ratios,
               "targets": targets,
               "config": {"data": str(data), "images": images, "store": store, "kinds": kinds, "sizes": sizes,
                          "batches": batches, "batch_size": batch_size, "warmup": warmup, "repeats": repeats,
                          "workers": workers, "channels": 3, "dtype": "float32", "device": str(dev),
                          "torch_threads": torch.get_num_threads()}}
    write_result(json_path, payload)
    print(f"made {made['images']} colour {made['size']}px JPEGs in {made['make_seconds']:.1f} s, packed "
          f"--store {store} in {made['pack_seconds']:.1f} s ({made['pack_images_per_s']:,.0f} img/s)")
    print(f"speed-up over dataloader: {ratios}\nwrote {json_path}")
    return payload
