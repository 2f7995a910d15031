"""Peak resident memory of the stream loader: it grows with the batch, not with the data set (issue 16).

Run: facesense bench memory --data data/shards --images 15339 --multiples 1,2,4 --batch-sizes 64,256 \
         --json benchmarks/results/memory-cpu.json

The colour RAF-layout set of `bench colour` (100x100 JPEGs made from FER2013 faces) is listed 1x, 2x and
4x (the same files repeated under new names) and each is packed `--store encoded`. Every (pack, loader,
batch size) case runs in a fresh process: after its imports it resets the kernel's peak-RSS mark
(`/proc/self/clear_refs` 5) and reads its resident memory (the baseline), builds a train-mode loader on
the train split and reads `--batches` batches (each dropped before the next), then reads its peak
(`VmHWM`). `loader_peak_mb` is peak minus baseline: what building and running the loader added;
`built_mb` is what the loader held once built, before its first batch. The
cases run with glibc's mmap threshold fixed at 1 MiB (ALLOCATOR_ENV, see there).

The stream loader runs the reference augmentation engine (compile_cpu=False): the compiled engine's
compile adds a fixed amount of memory (and ~20 s) to every case and says nothing about the data. The
resident loader, which decodes the whole split into memory, is the contrast: its peak follows the data.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import shutil
from pathlib import Path

from benchmarks.env import ROOT, BadOption, at_least, check_sizes, child_env, write_result

MB = 1e6
# Each case's allocator: glibc with a fixed mmap threshold, so that every block of 1 MiB or more (a batch, a
# decoded batch, the engine's temporaries) is mapped when allocated and unmapped when freed. With glibc's
# default sliding threshold, freed batch buffers stay in the heap or not depending on thread timing: the
# peak of one and the same case ranged 166-284 MB over 4 runs (batch 128), against 142 MB every run here.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(data: Path, kind: str, batch_size: int, size: int, batches: int, workers: int) -> dict:
    """One case, in this process (call it in a fresh one): the loader's peak memory over `batches` batches."""
    import torch  # noqa: F401  (imported before the baseline: its memory is not the loader's)

    import pipeline.stream  # noqa: F401
    from benchmarks.env import loader_stream
    from pipeline.loaders import LoaderConfig, make_loader

    reset = reset_peak()
    baseline_kb = _status_kb("VmRSS")
    cfg = LoaderConfig(kind=kind, batch_size=batch_size, img_size=size, channels=3, workers=workers,
                       compile_cpu=False)
    loader = make_loader(data, "train", cfg, "cpu")
    built_kb = _status_kb("VmRSS")  # labels, shapes and open shards: what the loader holds before a batch
    describe = loader.describe()
    stream = loader_stream(loader)
    seen = 0
    for _ in range(batches):
        images, labels = next(stream)
        seen += len(labels)
        del images, labels
    peak_kb = _status_kb("VmHWM")
    end_kb = _status_kb("VmRSS")
    loader.close()
    return {"kind": kind, "resolved_kind": loader.kind, "batch_size": batch_size, "size": size, "batches": batches,
            "images_read": seen, "split_images": len(loader.targets), "baseline_mb": baseline_kb * 1024 / MB,
            "peak_mb": peak_kb * 1024 / MB, "end_mb": end_kb * 1024 / MB,
            "loader_peak_mb": (peak_kb - baseline_kb) * 1024 / MB, "built_mb": (built_kb - baseline_kb) * 1024 / MB,
            "peak_reset": reset, "describe": describe}


def run_case(data: Path, kind: str, batch_size: int, size: int, batches: int, workers: int) -> dict:
    """`measure` in a fresh Python process (its own peak), its result parsed from the last output line."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", str(data), kind, str(batch_size),
                           str(size), str(batches), str(workers)], cwd=ROOT, env={**child_env(), **ALLOCATOR_ENV},
                          capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise RuntimeError(f"memory case {kind} batch {batch_size} on {data} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verdict(rows: list[dict], multiples: list[int], batch_sizes: list[int], decoded_1x: int) -> dict:
    """Flat in the data set: the stream loader's peak grows, from the smallest to the largest pack, by less
    than 5% of the decoded pixels the larger pack adds. Grows with the batch: at every pack, the peak at the
    largest batch exceeds the peak at the smallest."""
    def peak(kind, m, b):
        return next(r["loader_peak_mb"] for r in rows if r["kind"] == kind and r["multiple"] == m
                    and r["batch_size"] == b)

    lo, hi = min(multiples), max(multiples)
    added_mb = (hi - lo) * decoded_1x / MB
    by_data = {str(b): peak("stream", hi, b) - peak("stream", lo, b) for b in batch_sizes}
    by_batch = {str(m): peak("stream", m, max(batch_sizes)) - peak("stream", m, min(batch_sizes)) for m in multiples}
    flat = all(abs(v) < 0.05 * added_mb for v in by_data.values())
    grows = len(batch_sizes) < 2 or all(v > 0 for v in by_batch.values())
    return {"stream_growth_mb_smallest_to_largest_pack": by_data, "decoded_mb_added": added_mb,
            "stream_growth_mb_smallest_to_largest_batch": by_batch, "flat_in_data_set": flat,
            "grows_with_batch": grows, "met": flat and grows,
            "criterion": "growth with the data < 5% of the decoded pixels added; peak(largest batch) > "
                         "peak(smallest batch) at every pack"}


def run(data: Path, images: int, multiples: list[int], batch_sizes: list[int], size: int, batches: int,
        workers: int, resident: bool, json_path: Path) -> dict:
    from benchmarks.bench_stream import check_faces, pack_colour_set
    from pipeline.residency import decoded_bytes
    from pipeline.shards import load_manifest

    if not multiples or not batch_sizes:
        raise BadOption("--multiples and --batch-sizes: give at least one each, e.g. 1,2,4 and 64,256")
    at_least(1, images=images, batches=batches, workers=workers, **{"multiples": min(multiples),
                                                                    "batch_sizes": min(batch_sizes)})
    check_sizes([size])
    check_faces(data, images)
    work = Path(tempfile.mkdtemp(prefix="facesense-bench-memory-"))
    rows, packs = [], {}
    try:
        for m in multiples:
            shards, made = pack_colour_set(data, work / f"x{m}", images, "encoded", repeat=m)
            entry = load_manifest(shards)["splits"]["train"]
            if entry["count"] < max(batch_sizes):
                raise BadOption(f"--batch-sizes {max(batch_sizes)}: more than the {entry['count']} train images")
            packs[str(m)] = {**made, "train_images": entry["count"], "train_decoded_mb":
                             decoded_bytes(entry, entry["count"], size) / MB}
            cases = [("stream", b) for b in batch_sizes] + ([("resident", min(batch_sizes))] if resident else [])
            for kind, b in cases:
                row = {"multiple": m, **run_case(shards, kind, b, size, batches, workers)}
                rows.append(row)
                print(f"{m}x ({entry['count']:6d} train) {kind:8s} batch {b:4d}: loader peak "
                      f"{row['loader_peak_mb']:8.1f} MB (baseline {row['baseline_mb']:.0f} MB)")
            shutil.rmtree(work / f"x{m}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decoded_1x = packs[str(min(multiples))]["train_decoded_mb"] * MB / min(multiples)
    result = verdict(rows, multiples, batch_sizes, decoded_1x)
    payload = {"benchmark": "memory", "results": rows, "packs": packs, "target": result,
               "config": {"data": str(data), "images": images, "multiples": multiples, "batch_sizes": batch_sizes,
                          "size": size, "batches": batches, "workers": workers, "engine": "reference", "allocator_env": ALLOCATOR_ENV,
                          "channels": 3, "dtype": "float32"}}
    write_result(json_path, payload)
    print(f"stream peak growth with the data (MB): {result['stream_growth_mb_smallest_to_largest_pack']} "
          f"(decoded pixels added: {result['decoded_mb_added']:.0f} MB); with the batch (MB): "
          f"{result['stream_growth_mb_smallest_to_largest_batch']}; met: {result['met']}\nwrote {json_path}")
    return payload


if __name__ == "__main__":  # one case: DATA KIND BATCH SIZE BATCHES WORKERS -> one JSON line
    d, k, b, s, n, w = sys.argv[1:]
    print(json.dumps(measure(Path(d), k, int(b), int(s), int(n), int(w))))
