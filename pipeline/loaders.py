"""Loaders: (images, targets) batches already on the training device, one interface, five kinds.

* resident   - the split lives on the device as one uint8 tensor (an encoded split is decoded
               once, by the CPU decoder pool); a batch is an index into it plus one augmentation
               call (the fused Triton kernel on CUDA; on CPU the reference's math compiled by
               torch.compile into two vectorised stages, see kernels/cpu_fused.py, or the
               reference itself with compile_cpu=False). No workers, no host copies.
* stream     - for splits too large to keep decoded (`pipeline/stream.py`): each batch's rows
               are read from the shards and decoded on a prefetch thread (CPU decoder pool,
               torchvision nvJPEG on a GPU; DALI's nvJPEG when installed), then the resident
               loader's engine. Same plan, same batches; memory grows with the batch.
* dali       - the same epoch plan fed through the DALI pipeline (`pipeline/dali_augment.py`);
               encoded splits are decoded by DALI (fn.decoders.image, "mixed" on a GPU).
* dataloader - torch DataLoader + torchvision per-image PIL transforms, as the project we
               grow from did. Kept as the baseline every speed claim is compared with.
* auto       - resident when the split's decoded pixels fit the memory budget, else stream
               (`pipeline/residency.py`). `describe()` says in one line what was chosen and why.

All kinds share the epoch plan below, so they visit the same samples in the same
order for a given (seed, epoch, rank): seeded per-epoch shuffling; DDP ranks read
disjoint contiguous parts of the split; in train mode every rank is padded to the
same sample count (so every rank runs the same number of steps); eval mode visits
every sample of the rank's part exactly once, in order, with a partial last batch.

Work is split by how often it runs (as in airbench): the order and every augmentation
parameter of an epoch are drawn once when the epoch starts (`EpochPlan`); a batch is
then only slices of the plan and one augmentation call. The parameters are drawn on
the device the engine runs on, so resident (CUDA generator on CUDA) and DALI (CPU
generator) see the same draws on CPU only.

Targets are int64 labels, or with `soft_labels` (B, K) float32 FER+ vote distributions
(`pipeline/targets.py`), in the same order.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.reference import augment_reference
from kernels.spec import AugConfig, AugParams, OutputSpec, View, identity_params, sample_params, view_params
from pipeline import residency
from pipeline.decode import DecodePool, decode_image, decode_side
from pipeline.shards import SplitArrays, load_manifest, rank_range, read_split
from pipeline.targets import targets_tensor

KINDS = ("auto", "resident", "stream", "dali", "dataloader")


@dataclass
class LoaderConfig:
    kind: str = "auto"  # auto | resident | stream | dali | dataloader
    batch_size: int = 256  # samples per batch (per rank)
    img_size: int = 48  # output side; larger or smaller sizes are resampled in the augmentation
    channels: int = 1  # output channels: 1 = gray, 3 = RGB (colour data) or gray replicated (gray data)
    dtype: torch.dtype = torch.float32  # output dtype: float32, float16 or bfloat16
    mean: tuple[float, ...] = (0.5,)  # normalisation mean on the [0, 1] scale
    std: tuple[float, ...] = (0.25,)  # normalisation std on the [0, 1] scale
    aug: AugConfig = field(default_factory=AugConfig)  # random ranges (train mode only)
    train: bool = True  # True: shuffle + augment; False: eval mode (fixed order, no augmentation)
    drop_last: bool = True  # train mode: drop the last partial batch (eval mode never drops)
    seed: int = 0  # seeds shuffling and augmentation draws
    rank: int = 0  # this process's DDP rank
    world_size: int = 1  # number of DDP ranks
    workers: int = 2  # worker processes (dataloader) / threads (dali, the stream loader's decoder pool)
    compile_cpu: bool = True  # resident/stream on CPU: torch.compile the fused engine (once per output shape)
    soft_labels: bool = False  # targets: (B, K) float32 FER+ vote distributions instead of int64 labels
    resident_budget: int | None = None  # bytes a resident split may take (per rank); None: half the free memory

    def output_spec(self) -> OutputSpec:
        return OutputSpec(size=self.img_size, channels=self.channels, mean=tuple(self.mean),
                          std=tuple(self.std), dtype=self.dtype)


def resolve_kind(kind: str, device: torch.device, decoded_bytes: int | None = None,
                 budget: int | None = None) -> str:
    """The kind a loader request runs as: auto -> resident when `decoded_bytes` fit `budget`, else stream.

    Without sizes (decoded_bytes None), auto is resident: on CUDA its Triton kernel needs no host
    work per batch and no extra wheel; DALI stays available as --loader dali (README, "Loaders").
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loader kind {kind!r}; expected one of {', '.join(KINDS)}")
    return residency.choose(kind, decoded_bytes, budget)


def pick_engine(device: torch.device, compile_cpu: bool):
    """(augment function, its name) for uint8 sources on `device`: Triton on CUDA, compiled or reference on CPU."""
    if device.type == "cuda":
        from kernels.triton_augment import augment_triton, triton_available

        if triton_available(device):
            return augment_triton, "triton"
        return augment_reference, "reference"
    if compile_cpu:
        from kernels.cpu_fused import compiled_engine

        # The label predates the function's name; benchmarks/results record it, so it stays.
        return compiled_engine(), "compiled_explicit"
    return augment_reference, "reference"


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def _generator(seed: int, epoch: int, rank: int, stream: int, device="cpu") -> torch.Generator:
    """An independent, reproducible random stream per (seed, epoch, rank, purpose)."""
    state = np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


@dataclass
class Placement:
    """What make_loader knew when it chose where the split lives (for describe())."""

    requested: str  # the kind asked for (auto, resident, ...)
    decoded_bytes: int  # this rank's part, decoded
    budget: int  # bytes the resident split may take


class Loader:
    """The shared epoch plan; subclasses turn index batches into image batches."""

    kind = "?"  # set by make_loader: the kind this loader runs as
    split: str | None = None  # set by make_loader
    placement: Placement | None = None  # set by make_loader

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        if cfg.batch_size < 1:
            raise ValueError(f"batch size {cfg.batch_size} must be at least 1")
        if part.channels == 3 and cfg.channels == 1:
            raise ValueError("the data is colour (3 channels) but the loader outputs 1: ask for 3 channels "
                             "or pack the data with --channels 1")
        self.cfg, self.device, self.classes = cfg, device, part.classes
        self.out = cfg.output_spec()
        self.part_size = len(part.labels)
        self.storage, self.in_channels, self.image_shape = part.storage, part.channels, part.image_shape
        # Train mode pads every rank to the largest part, so all ranks take the same steps.
        self.num_samples = math.ceil(count / cfg.world_size) if cfg.train else self.part_size
        if self.num_samples == 0:
            raise ValueError("the split is empty for this rank")
        if cfg.train and cfg.drop_last and self.num_samples < cfg.batch_size:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the {self.num_samples} "
                             f"samples per rank; lower --batch-size")
        self.targets = targets_tensor(part, cfg.soft_labels)  # CPU; subclasses move it where they need it
        self.epoch, self.start_batch = 0, 0
        self.view: View | None = None  # eval mode: a fixed test-time view instead of the plain image

    def set_view(self, view: View | None) -> None:
        """Eval mode: show every image through `view` (test-time augmentation); None: plain images."""
        if self.cfg.train:
            raise ValueError("views are for eval-mode loaders (train mode draws random augmentation)")
        self.view = view

    def __len__(self) -> int:
        if self.cfg.train and self.cfg.drop_last:
            return self.num_samples // self.cfg.batch_size
        return math.ceil(self.num_samples / self.cfg.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; start_batch > 0 resumes mid-epoch with identical draws."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int | None = None) -> torch.Tensor:
        """(num_samples,) int64 CPU indices into the rank's part for an epoch (default: current)."""
        if not self.cfg.train:
            return torch.arange(self.part_size)
        epoch = self.epoch if epoch is None else epoch
        order = torch.randperm(self.part_size, generator=_generator(self.cfg.seed, epoch, self.cfg.rank, 0))
        pad = self.num_samples - self.part_size
        return torch.cat([order, order[:pad]]) if pad else order

    def index_batches(self) -> list[torch.Tensor]:
        """The current epoch's order cut into batches (CPU views of one tensor)."""
        order = self.epoch_order()
        b = self.cfg.batch_size
        return [order[i * b:(i + 1) * b] for i in range(len(self))]

    def batch_slices(self, start: int) -> list[slice]:
        """Positions in the epoch plan of each batch from batch `start` to the epoch's end."""
        b, n = self.cfg.batch_size, self.num_samples
        return [slice(i * b, min((i + 1) * b, n)) for i in range(start, len(self))]

    def plan(self, epoch: int, device) -> "EpochPlan":
        """The epoch's order and augmentation parameters, drawn once (identity params in eval mode)."""
        order = self.epoch_order(epoch)
        if not self.cfg.train:
            n = len(order)
            params = identity_params(n, device) if self.view is None else view_params(n, self.view, device)
            return EpochPlan(order.to(device), params)
        gen = _generator(self.cfg.seed, epoch, self.cfg.rank, 1, device)
        return EpochPlan(order.to(device), sample_params(len(order), self.cfg.aug, gen))

    # -- what lives where ------------------------------------------------------------------------

    def describe(self) -> str:
        """One line: the split, its storage and size, and where it lives (and why), e.g.
        "train: 28,709 images raw 48x48 gray, 66 MB decoded, resident on cpu (budget 11.2 GB), engine
        compiled_explicit", or "train: 15,339 images encoded 100x100 RGB, 460 MB decoded > budget 100 MB:
        streaming, CPU decoder pool x2, engine compiled_explicit"."""
        colour = "RGB" if self.in_channels == 3 else "gray"
        side = self.cfg.img_size
        shape = (f"{self.image_shape[0]}x{self.image_shape[1]}" if self.image_shape
                 else f"of differing sizes (decoded at {side}x{side})")
        head = f"{self.split or 'split'}: {self.part_size:,} images {self.storage} {shape} {colour}"
        p = self.placement
        if p is None:
            return f"{head}: {self.describe_where('')}"
        size, budget = residency.human_bytes(p.decoded_bytes), residency.human_bytes(p.budget)
        chosen = "" if p.requested == "auto" else f", --loader {p.requested}"
        if p.decoded_bytes > p.budget:
            return f"{head}, {size} decoded > budget {budget}{chosen}: {self.describe_where('')}"
        if self.kind == "resident":  # the budget is about where it lives: said there
            return f"{head}, {size} decoded, {self.describe_where(f' (budget {budget})')}"
        return f"{head}, {size} decoded (budget {budget}){chosen}: {self.describe_where('')}"

    def describe_where(self, budget: str) -> str:
        """Where the pixels live and who decodes and augments them; `budget` follows the device name."""
        return self.kind

    def close(self) -> None:
        """Release threads and open files (also done when the process ends)."""


@dataclass
class EpochPlan:
    """Everything random about one epoch: per batch only slices of it are taken."""

    order: torch.Tensor  # (n,) int64 indices into the rank's part, in visiting order
    params: AugParams  # one parameter set per position of `order`


def decode_part(part: SplitArrays, size: tuple[int, int], workers: int, chunk: int = 1024) -> np.ndarray:
    """An encoded part decoded once into one (N, H, W[, 3]) uint8 array (the resident loader's pixels)."""
    n = len(part.labels)
    out = np.empty((n, *size) + ((3,) if part.channels == 3 else ()), np.uint8)
    pool = DecodePool(workers)
    try:
        blobs = part.encoded.read_all()  # whole shard reads: far faster than row lookups
        for lo in range(0, n, chunk):
            out[lo:lo + chunk] = pool.decode_batch(blobs[lo:lo + chunk], part.channels, size)
            blobs[lo:lo + chunk] = [None] * len(blobs[lo:lo + chunk])  # the bytes go as their pixels come
    finally:
        pool.close()
        part.encoded.close()
    return out


class ResidentLoader(Loader):
    """The split on the device as one uint8 tensor; per batch only indexing + one augment call."""

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        super().__init__(part, count, cfg, device)
        self.decoded_by = None
        if part.images is None:  # encoded: decode once, then exactly the raw path
            workers = max(1, cfg.workers)
            pixels = decode_part(part, decode_side(part, cfg.img_size), workers)
            self.decoded_by = f"CPU decoder pool x{workers}"
        else:
            pixels = part.images
        self.images = torch.from_numpy(pixels).to(device)
        self.labels = self.targets.to(device)
        self.augment, self.engine = pick_engine(device, cfg.compile_cpu)

    def __iter__(self):
        plan = self.plan(self.epoch, self.device)
        labels = self.labels[plan.order]  # one gather per epoch
        params = plan.params
        if self.engine == "triton":  # what the kernel reads, computed for the epoch: a batch is one launch
            from kernels.triton_augment import kernel_params

            params = kernel_params(params, self.out.size, self.device)
        for part in self.batch_slices(self.start_batch):
            yield self.augment(self.images, plan.order[part], params[part], self.out), labels[part]

    def describe_where(self, budget: str) -> str:
        decoded = f", decoded once by the {self.decoded_by}" if self.decoded_by else ""
        return f"resident on {self.device}{budget}{decoded}, engine {self.engine}"


class _RowSource:
    """A batch's source rows, whatever the split's storage: raw pixels in memory or read lazily, or
    the file bytes of an encoded split (a list of 1-D uint8 arrays)."""

    def __init__(self, part: SplitArrays):
        self.images, self.rows, self.encoded = part.images, part.rows, part.encoded

    def __call__(self, index: np.ndarray):
        if self.encoded is not None:
            return self.encoded.read(index)
        if self.images is not None:
            return self.images[index]
        return self.rows.read(index)

    def one(self, i: int):
        if self.images is not None:
            return self.images[i]
        return self(np.array([i]))[0]

    def close(self) -> None:
        for reader in (self.rows, self.encoded):
            if reader is not None:
                reader.close()


@dataclass
class _DaliPipeline:
    """One built DALI pipeline and the epochs its source has handed it.

    DALI asks its source for an epoch ahead of use (prefetch, and again at each reset), before
    the training loop calls set_epoch, so the source counts epochs itself from `origin`.
    """

    origin: tuple[int, int]  # (epoch, start batch) the pipeline was built for
    iterator: Any = None  # the DaliBatchIterator over `DaliLoader._epoch_batches(self)`
    epochs_started: int = 0  # epochs the source has begun producing
    # What the next `for` over the iterator yields: (epoch, start batch), known once the last batch
    # of an epoch went out; None: unknown (an epoch cut short, a new view): build afresh.
    next: tuple[int, int] | None = None

    def start_epoch(self) -> tuple[int, int]:
        """The (epoch, start batch) the source produces now, counted on from the origin."""
        epoch, start = self.origin
        if self.epochs_started:
            epoch, start = epoch + self.epochs_started, 0
        self.epochs_started += 1
        return epoch, start


class DaliLoader(Loader):
    """The split fed through DALI, following the shared epoch plan.

    Raw splits: host-resident uint8 pixels (read per batch from the shards when they do not fit
    the budget). Encoded splits: each batch's file bytes, decoded inside the pipeline by
    fn.decoders.image ("mixed", i.e. nvJPEG, on a GPU), with each file's own (h, w) in the
    affine matrices, so decode and resize to the output size are one pass.

    The plan is drawn with a CPU generator, so on CPU DALI and the resident loader see the
    same draws (tested); on CUDA the resident loader draws on the GPU and they differ.
    DALI carries each sample's part index as its "label"; the targets (labels or soft) are
    looked up from it, so soft targets need nothing from DALI.

    The pipeline (a `_DaliPipeline`) counts epochs itself from where it was built, and is rebuilt
    only when asked for an epoch it did not expect (the first one, a resume, or after an epoch
    that was not run to the end).
    """

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        super().__init__(part, count, cfg, device)
        self.source = _RowSource(part)
        self.shapes = part.encoded.shapes if part.encoded is not None else None
        self.labels = self.targets.to(device)
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        self.dali: _DaliPipeline | None = None
        self.builds = 0  # pipelines built so far: one per run, unless epochs are cut short or skipped

    def set_view(self, view: View | None) -> None:
        super().set_view(view)
        if self.dali is not None:
            self.dali.next = None  # DALI may already be preparing a pass with the previous view: rebuild

    def _epoch_batches(self, dali: _DaliPipeline):
        from pipeline.dali_augment import dali_param_arrays

        epoch, start = dali.start_epoch()
        plan = self.plan(epoch, "cpu")
        order = plan.order.numpy()
        # Encoded files keep their own sizes (DALI decodes each at its size): per-sample (h, w).
        in_hw = self.shapes[order, :2] if self.shapes is not None else tuple(self.image_shape)
        arrays = dali_param_arrays(plan.params, in_hw, self.out)  # the whole epoch at once
        for rows in self.batch_slices(start):
            idx = order[rows]
            yield self.source(idx), idx, {k: v[rows] for k, v in arrays.items()}

    def _build(self):
        from pipeline.dali_augment import dali_iterator

        extra = {}
        if self.storage == "encoded" or self.in_channels != 1:  # the plain call is the raw gray path of old
            extra = {"encoded": self.storage == "encoded", "in_channels": self.in_channels}
        return dali_iterator(functools.partial(self._epoch_batches, self.dali), self.out, self.cfg.batch_size,
                             device_id=self.device_id, num_threads=max(1, self.cfg.workers), seed=self.cfg.seed,
                             **extra)

    def __iter__(self):
        wanted = (self.epoch, self.start_batch)
        dali = self.dali
        if dali is None or dali.next != wanted:
            dali = self.dali = _DaliPipeline(origin=wanted)
            dali.iterator = self._build()
            self.builds += 1
        dali.next = None
        remaining = len(self) - self.start_batch
        # The training loop breaks right after an epoch's last batch, so nothing after this loop is
        # sure to run: record the hand-over when the last batch goes out. DALI's iterator is then at
        # its epoch's end; the next `for` over it (iter() resets it) continues with the epoch it is
        # already prefetching.
        for i, (images, index) in enumerate(dali.iterator):
            if i == remaining - 1:  # eval passes do not depend on the epoch: the same pass comes next
                dali.next = (self.epoch + 1, 0) if self.cfg.train else (self.epoch, 0)
            yield images.to(self.device), self.labels[index.to(self.labels.device)]

    def describe_where(self, budget: str) -> str:
        where = "GPU" if self.device_id is not None else "CPU"
        mode = "streaming, " if self.kind == "stream" else ""
        if self.storage == "encoded":
            decoder = "mixed (nvJPEG)" if self.device_id is not None else "cpu"
            return f"{mode}file bytes read per batch, DALI decodes ({decoder}) and augments on the {where}"
        held = "in host memory" if self.source.images is not None else "read per batch from the shards"
        return f"{mode}raw pixels {held}, DALI augments on the {where}"

    def close(self) -> None:
        self.source.close()


class _PilDataset(torch.utils.data.Dataset):
    """Per-image torchvision transforms on PIL images (the baseline's data path).

    Encoded splits are decoded per image by Pillow (the pack's decode rule), colour kept.
    """

    def __init__(self, source: _RowSource, targets: torch.Tensor, in_channels: int, cfg: LoaderConfig):
        from torchvision import transforms as T

        self.source, self.targets, self.in_channels = source, targets, in_channels
        self.soft = targets.dim() == 2
        mean, std = cfg.output_spec().channel_stats()
        # Gray data: Grayscale(C) (replicates to 3 for 3-channel stems); colour data stays RGB.
        head = ([T.Grayscale(cfg.channels)] if in_channels == 1 else []) + [T.Resize((cfg.img_size, cfg.img_size))]
        aug = [T.RandomHorizontalFlip(), T.RandomRotation(15), T.ColorJitter(0.2, 0.2, 0.2, 0.1)]
        tail = [T.ToTensor(), T.Normalize(mean, std)]
        self.transform = T.Compose(head + (aug if cfg.train else []) + tail)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        pixels = self.source.one(i)
        if self.source.encoded is not None:
            pixels = decode_image(pixels, self.in_channels)
        target = self.targets[i] if self.soft else int(self.targets[i])
        return self.transform(Image.fromarray(pixels)), target


class _EpochBatches:
    """A batch sampler that follows the owning loader's current epoch plan."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __iter__(self):
        batches = self.loader.index_batches()
        return iter([b.tolist() for b in batches[self.loader.start_batch:]])

    def __len__(self) -> int:
        return len(self.loader) - self.loader.start_batch


class TorchDataLoader(Loader):
    """torch DataLoader with worker processes: the baseline every speed claim is compared with."""

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        super().__init__(part, count, cfg, device)
        self.source = _RowSource(part)
        dataset = _PilDataset(self.source, self.targets, part.channels, cfg)
        # Augmentation randomness comes from each worker's torch seed, derived from this generator.
        # forkserver, not fork: a process that already runs DALI, compile or OpenMP threads can
        # deadlock a forked child on a lock some thread held at fork time (seen in the tests).
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_EpochBatches(self), num_workers=cfg.workers,
            pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
            multiprocessing_context="forkserver" if cfg.workers > 0 else None,
            generator=torch.Generator().manual_seed(cfg.seed))

    def set_view(self, view: View | None) -> None:
        if view is not None:
            raise ValueError("test-time views need the resident or dali loader (the dataloader baseline "
                             "has its own per-image transforms)")
        super().set_view(view)

    def __iter__(self):
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield images.to(dtype=self.cfg.dtype, memory_format=torch.channels_last), labels.to(self.device)

    def describe_where(self, budget: str) -> str:
        held = ("file bytes read and decoded per image" if self.storage == "encoded" else
                "raw pixels in host memory" if self.source.images is not None else "raw rows read per image")
        return f"torch DataLoader x{self.cfg.workers} workers, PIL per image, {held}"

    def close(self) -> None:
        self.source.close()


def _part_bytes(entry: dict, cfg: LoaderConfig) -> int:
    lo, hi = rank_range(entry["count"], cfg.rank, cfg.world_size)
    return residency.decoded_bytes(entry, hi - lo, cfg.img_size)


def make_loader(data_dir: Path | str, split: str, cfg: LoaderConfig, device: torch.device | str,
                manifest: dict | None = None) -> Loader:
    """Decide where this rank's part of `split` lives, read it from the shards, wrap it in a loader.

    `manifest`: the parsed manifest.json when the caller has read it already (read once per run)."""
    from pipeline.stream import StreamLoader

    device = torch.device(device)
    resolve_kind(cfg.kind, device)  # an unknown kind fails before any reading
    manifest = manifest or load_manifest(data_dir)
    entry = manifest["splits"].get(split)
    if entry is None:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(manifest['splits'])}")
    nbytes = _part_bytes(entry, cfg)
    # dali and dataloader keep raw pixels in host memory (DALI's source is the host), the others on `device`.
    home = torch.device("cpu") if cfg.kind in ("dali", "dataloader") else device
    budget = cfg.resident_budget if cfg.resident_budget is not None else \
        residency.default_budget(home, cfg.world_size)
    kind = resolve_kind(cfg.kind, device, nbytes, budget)
    lazy = kind == "stream" or (kind in ("dali", "dataloader") and nbytes > budget)
    part = read_split(data_dir, split, cfg.rank, cfg.world_size, manifest=manifest, lazy=lazy)
    cls = {"resident": ResidentLoader, "stream": StreamLoader, "dali": DaliLoader, "dataloader": TorchDataLoader}[kind]
    if kind == "stream" and device.type == "cuda" and part.storage == "encoded" and dali_available():
        cls = DaliLoader  # DALI's nvJPEG decodes and augments in one pipeline
    loader = cls(part, entry["count"], cfg, device)
    loader.kind, loader.split = kind, split
    loader.placement = Placement(cfg.kind, nbytes, budget)
    return loader
