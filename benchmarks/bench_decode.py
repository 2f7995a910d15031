"""JPEG decode images/s per decoder at one size: what the stream loader and DALI pay per image.

Run: facesense bench decode --data data/shards --size 224 --images 2048 --json benchmarks/results/decode-cpu.json

The JPEGs are FER2013 faces resized to --size and tinted per image (benchmarks/colour_set.py), so they
are colour files of the size measured; every decoder decodes them to RGB at their own size:

* `pillow_pool`    - pipeline.decode.DecodePool (Pillow on --workers threads): the stream loader on CPU
* `torchvision_cpu`- torchvision.io.decode_jpeg on a list, on the CPU (libjpeg-turbo)
* `nvjpeg`         - torchvision.io.decode_jpeg(list, device="cuda"): the stream loader on a GPU without DALI
* `dali_cpu`, `dali_mixed` - DALI's fn.decoders.image, device "cpu" / "mixed" (nvJPEG): the DALI loader

A decoder that cannot run here (no CUDA, DALI not installed) is a row with `skipped` and the reason. The
decoders take turns per timed repeat (a full pass over the images in batches of --batch-size) after one
untimed pass each; the GPU is synchronised before the clock is read. Each decoder's pixels are compared
with Pillow's (`vs_pillow`: largest absolute difference, share of pixels that differ): libjpeg builds and
nvJPEG round differently.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.env import at_least, check_sizes, resolve_device, sync, write_result

DECODERS = ("pillow_pool", "torchvision_cpu", "nvjpeg", "dali_cpu", "dali_mixed")


def make_jpegs(data: Path, images: int, size: int, seed: int = 0) -> list[bytes]:
    from benchmarks.colour_set import colour_faces, encode_jpegs, fer_faces

    gray, _ = fer_faces(data, images)
    return encode_jpegs(colour_faces(gray, size, seed))


def _batches(blobs: list, batch_size: int) -> list[list]:
    return [blobs[i:i + batch_size] for i in range(0, len(blobs), batch_size)]


class PillowPool:
    def __init__(self, blobs, batch_size, size, workers, device):
        from pipeline.decode import DecodePool

        self.pool, self.size = DecodePool(workers), size
        self.batches = _batches(blobs, batch_size)

    def run(self) -> list[np.ndarray]:
        return [self.pool.decode_batch(b, 3, (self.size, self.size)) for b in self.batches]

    def pixels(self, outputs) -> np.ndarray:
        return np.concatenate(outputs)

    def first_pass(self) -> np.ndarray:
        return self.pixels(self.run())

    def close(self):
        self.pool.close()


class TorchvisionDecode:
    """decode_jpeg on lists of byte tensors, on `device` (cpu, or cuda: nvJPEG)."""

    def __init__(self, blobs, batch_size, size, workers, device):
        from torchvision.io import ImageReadMode

        self.device, self.mode = device, ImageReadMode.RGB
        self.batches = [[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch]
                        for batch in _batches(blobs, batch_size)]

    def run(self) -> list:
        from torchvision.io import decode_jpeg

        return [decode_jpeg(batch, mode=self.mode, device=self.device) for batch in self.batches]

    def pixels(self, outputs) -> np.ndarray:
        return torch.stack([img for batch in outputs for img in batch]).permute(0, 2, 3, 1).cpu().numpy()

    def first_pass(self) -> np.ndarray:
        return self.pixels(self.run())

    def close(self):
        pass


class DaliDecode:
    """fn.decoders.image on DALI's own threads; "mixed" (nvJPEG) with a device, "cpu" without. Only whole
    batches are fed (DALI's batch size is fixed): the images of a last partial batch are left out.

    Synchronous (no prefetch, not pipelined): each run() decodes its batch while it is timed, like the
    other decoders' calls. A prefetching pipeline would have batches ready from the time between passes,
    which the clock would not see (an overestimate of up to the queue depth in batches per pass)."""

    def __init__(self, blobs, batch_size, size, workers, device):
        from nvidia.dali import fn, pipeline_def, types

        self.batches = [[np.frombuffer(b, np.uint8) for b in batch]
                        for batch in _batches(blobs, batch_size) if len(batch) == batch_size]
        if not self.batches:
            raise ValueError(f"DALI needs at least one whole batch of {batch_size} images")
        gpu = device.type == "cuda"

        @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=(device.index or 0) if gpu else None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def decode():
            files = fn.external_source(source=self.batches, cycle="quiet", dtype=types.UINT8)
            return fn.decoders.image(files, device="mixed" if gpu else "cpu", output_type=types.RGB)

        self.pipe = decode()
        self.pipe.build()

    def run(self) -> list:
        outputs = [self.pipe.run()[0] for _ in self.batches]
        if hasattr(outputs[-1], "as_cpu"):
            outputs[-1] = outputs[-1].as_cpu()  # waits for DALI's stream: the pass's work is done
        return outputs

    def pixels(self, outputs=None) -> np.ndarray:
        """A pass's pixels, each batch copied out as it comes (DALI reuses its output buffers)."""
        return np.concatenate([self._array(self.pipe.run()[0]) for _ in self.batches])

    @staticmethod
    def _array(out) -> np.ndarray:
        return np.array((out.as_cpu() if hasattr(out, "as_cpu") else out).as_array())

    def first_pass(self) -> np.ndarray:
        return self.pixels()

    def close(self):
        del self.pipe


def decoder_for(name: str, device: torch.device):
    """(class, None) for a decoder that can run here, else (None, the reason it cannot)."""
    from pipeline.loaders import dali_available

    if name in ("nvjpeg", "dali_mixed") and device.type != "cuda":
        return None, "no CUDA device: GPU decode needs a GPU"
    if name.startswith("dali") and not dali_available():
        return None, "DALI not installed"
    return {"pillow_pool": PillowPool, "torchvision_cpu": TorchvisionDecode, "nvjpeg": TorchvisionDecode,
            "dali_cpu": DaliDecode, "dali_mixed": DaliDecode}[name], None


def decode_rates(blobs: list, size: int, decoders: list[str], batch_size: int, repeats: int, workers: int,
                 device: torch.device) -> list[dict]:
    """One row per decoder: images/s of each timed pass (decoders in turns), its median, and its pixels
    against Pillow's; or `skipped` with the reason."""
    rows, running = {}, {}
    for name in decoders:
        cls, reason = decoder_for(name, device)
        if cls is None:
            rows[name] = {"decoder": name, "skipped": reason}
            continue
        where = device if name in ("nvjpeg", "dali_mixed") else torch.device("cpu")
        try:
            running[name] = (cls(blobs, batch_size, size, workers, where), where)
        except (ImportError, RuntimeError, ValueError) as exc:
            rows[name] = {"decoder": name, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    pixels = {}
    for name, (dec, where) in running.items():  # the untimed pass: warm-up and the pixels compared
        pixels[name] = dec.first_pass()
        rows[name] = {"decoder": name, "device": str(where), "rates": []}
    for _ in range(repeats):
        for name, (dec, where) in running.items():
            n = len(pixels[name])
            sync(where)
            start = time.perf_counter()
            dec.run()
            sync(where)
            rows[name]["rates"].append(n / (time.perf_counter() - start))
    reference = pixels.get("pillow_pool")
    for name, (dec, _) in running.items():
        rows[name]["images_per_s"] = statistics.median(rows[name]["rates"])
        rows[name]["images"] = len(pixels[name])
        if reference is not None and name != "pillow_pool":
            diff = np.abs(pixels[name].astype(np.int16) - reference[:len(pixels[name])].astype(np.int16))
            rows[name]["vs_pillow"] = {"max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean()),
                                       "differing_pixels_share": float(np.count_nonzero(diff) / diff.size)}
        dec.close()
    return [rows[name] for name in decoders]


def run(data: Path, size: int, images: int, decoders: list[str], batch_size: int, repeats: int, workers: int,
        device: str, json_path: Path | None) -> dict:
    from benchmarks.env import BadOption
    from benchmarks.bench_stream import check_faces

    unknown = [d for d in decoders if d not in DECODERS]
    if unknown or not decoders:
        raise BadOption(f"--decoders {','.join(unknown) or '(none)'}: expected one or more of {', '.join(DECODERS)}")
    check_sizes([size])
    at_least(1, images=images, batch_size=batch_size, repeats=repeats, workers=workers)
    dev = resolve_device(device)
    check_faces(data, images)
    start = time.perf_counter()
    blobs = make_jpegs(data, images, size)
    made_s = time.perf_counter() - start
    rows = decode_rates(blobs, size, decoders, batch_size, repeats, workers, dev)
    payload = {"benchmark": "decode", "results": rows,
               "config": {"data": str(data), "size": size, "images": images, "batch_size": batch_size,
                          "repeats": repeats, "workers": workers, "device": str(dev),
                          "jpeg_bytes_mean": float(np.mean([len(b) for b in blobs])), "jpeg_quality": 90,
                          "make_seconds": made_s, "torch_threads": torch.get_num_threads()}}
    if json_path is not None:
        write_result(json_path, payload)
    for r in rows:
        if "skipped" in r:
            print(f"{r['decoder']:16s} skipped: {r['skipped']}")
        else:
            vs = r.get("vs_pillow")
            print(f"{r['decoder']:16s} {r['images_per_s']:10,.0f} img/s at {size} px"
                  + (f"  (vs Pillow: max |diff| {vs['max_abs_diff']}, {100 * vs['differing_pixels_share']:.2f}% "
                     f"of pixels differ)" if vs else ""))
    if json_path is not None:
        print(f"wrote {json_path}")
    return payload
