"""The stream loader: a split too large to keep decoded is read and decoded batch by batch.

Per batch: that batch's rows are read from the shards (file bytes of an encoded split, or
raw pixel rows), decoded to (B, H, W[, C]) uint8 at the split's decode side (the CPU
decoder pool, or nvJPEG on a GPU), and augmented by the same engine and the same epoch plan
as the resident loader, so both yield the same batches. Memory grows with the batch, not
with the data set: the loader keeps labels (and shapes) in memory, never pixels or bytes of
more than the batches in flight.

Decode overlaps the training step: a background thread (`Prefetcher`) prepares the next
batches, at most `depth` ahead (a bounded queue). When an epoch is cut short (the training
loop breaks, an exception, the loader dropped), the generator's `finally` stops the thread
and joins it, so no thread outlives its epoch.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.decode import DecodeError, DecodePool, decode_side
from pipeline.errors import ShardError
from pipeline.loaders import Loader, LoaderConfig, pick_engine
from pipeline.shards import SplitArrays

_DONE = object()


class Prefetcher:
    """Runs `load(item)` for each item on one background thread, at most `depth` results ahead."""

    def __init__(self, load: Callable, items: Iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(load, list(items)), daemon=True,
                                       name="stream-prefetch")
        self.thread.start()

    def _run(self, load: Callable, items: list) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._queue.put((True, load(item)))
        except BaseException as exc:  # handed to the consumer, raised there with its traceback
            self._queue.put((False, exc))
            return
        self._queue.put((True, _DONE))

    def __iter__(self):
        while True:
            ok, value = self._queue.get()
            if not ok:
                raise value
            if value is _DONE:
                return
            yield value

    def close(self) -> None:
        """Stop after the item in progress; drain the queue so a blocked put returns; join."""
        self._stop.set()
        while self.thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)


class StreamLoader(Loader):
    """Read + decode per batch on a prefetch thread, then the resident loader's engine and plan."""

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device,
                 prefetch: int = 2):
        super().__init__(part, count, cfg, device)
        self.channels = part.channels
        self.side = decode_side(part, cfg.img_size)
        self.encoded = part.encoded  # lazy: file bytes read per batch
        self.rows = part.rows if part.encoded is None else None  # lazy raw rows
        if self.encoded is None and self.rows is None:
            raise ValueError("the stream loader reads rows lazily: read the split with read_split(lazy=True)")
        self.labels = self.targets.to(device)
        self.augment, self.engine = pick_engine(device, cfg.compile_cpu)
        self.pool = DecodePool(max(1, cfg.workers)) if self.encoded is not None else None
        self.decoder, self.decoder_name = self._decoder()
        self.prefetch = prefetch
        self.prefetcher: Prefetcher | None = None  # the epoch in progress's thread
        self._arange = torch.arange(cfg.batch_size, device=device)

    def _decoder(self):
        if self.encoded is None:
            return None, "raw rows read per batch"
        if self.device.type == "cuda":
            from pipeline.gpu_decode import NvjpegDecoder, nvjpeg_available

            if nvjpeg_available(self.device):
                return NvjpegDecoder(self.device, self.pool), f"nvJPEG (torchvision) on {self.device}"
        return self.pool, f"CPU decoder pool x{self.pool.workers}"

    def load(self, index: np.ndarray) -> torch.Tensor:
        """The uint8 pixels of part rows `index`, (B, H, W[, C]) on the device."""
        if self.encoded is None:
            pixels = torch.from_numpy(self.rows.read(index))
        else:
            blobs = self.encoded.read(index)
            try:
                pixels = self.decoder.decode_batch(blobs, self.channels, self.side)
            except DecodeError as exc:
                raise ShardError(f"{self.split or 'split'}: an image of rows {index.min()}..{index.max()} does "
                                 f"not decode ({exc}); re-pack the data") from exc
            if isinstance(pixels, np.ndarray):
                pixels = torch.from_numpy(pixels)
        if pixels.device != self.device:
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
        return pixels

    def __iter__(self):
        plan = self.plan(self.epoch, self.device)
        labels = self.labels[plan.order]
        params = plan.params
        if self.engine == "triton":
            from kernels.triton_augment import kernel_params

            params = kernel_params(params, self.out.size, self.device)
        order = plan.order.cpu().numpy()
        slices = self.batch_slices(self.start_batch)
        prefetcher = self.prefetcher = Prefetcher(lambda s: self.load(order[s]), slices, self.prefetch)
        try:
            for part, images in zip(slices, prefetcher):
                index = self._arange[:images.shape[0]]
                yield self.augment(images, index, params[part], self.out), labels[part]
        finally:
            prefetcher.close()

    def describe_where(self, budget: str) -> str:
        return f"streaming, {self.decoder_name}, engine {self.engine}"

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.pool is not None:
            self.pool.close()
        for reader in (self.encoded, self.rows):
            if reader is not None:
                reader.close()


__all__ = ["Prefetcher", "StreamLoader"]
