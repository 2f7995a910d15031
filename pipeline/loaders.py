"""Loaders: (images, labels) batches already on the training device, one interface, three kinds.

* resident   - the split lives on the device as one uint8 tensor; a batch is an index
               into it plus one augmentation call (the fused Triton kernel on CUDA; on CPU
               the reference's math compiled by torch.compile into two vectorised stages,
               see kernels/cpu_fused.py, or the reference itself with compile_cpu=False).
               No workers, no host copies.
* dali       - the same epoch plan fed through the DALI pipeline (`pipeline/dali_augment.py`).
* dataloader - torch DataLoader + torchvision per-image PIL transforms, as the project we
               grow from did. Kept as the baseline every speed claim is compared with.
* auto       - resident (see README for why).

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
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.reference import augment_reference
from kernels.spec import AugConfig, AugParams, OutputSpec, View, identity_params, sample_params, view_params
from pipeline.shards import SplitArrays, load_manifest, read_split

KINDS = ("auto", "resident", "dali", "dataloader")


@dataclass
class LoaderConfig:
    kind: str = "auto"  # auto | resident | dali | dataloader
    batch_size: int = 256  # samples per batch (per rank)
    img_size: int = 48  # output side; 48 is native, larger sizes are resampled in the augmentation
    channels: int = 1  # 1 = gray, 3 = gray replicated (for 3-channel stems)
    dtype: torch.dtype = torch.float32  # output dtype: float32, float16 or bfloat16
    mean: tuple[float, ...] = (0.5,)  # normalisation mean on the [0, 1] scale
    std: tuple[float, ...] = (0.25,)  # normalisation std on the [0, 1] scale
    aug: AugConfig = field(default_factory=AugConfig)  # random ranges (train mode only)
    train: bool = True  # True: shuffle + augment; False: eval mode (fixed order, no augmentation)
    drop_last: bool = True  # train mode: drop the last partial batch (eval mode never drops)
    seed: int = 0  # seeds shuffling and augmentation draws
    rank: int = 0  # this process's DDP rank
    world_size: int = 1  # number of DDP ranks
    workers: int = 2  # worker processes (dataloader) / threads (dali)
    compile_cpu: bool = True  # resident on CPU: torch.compile the fused engine (compiles once per output shape)

    def output_spec(self) -> OutputSpec:
        return OutputSpec(size=self.img_size, channels=self.channels, mean=tuple(self.mean),
                          std=tuple(self.std), dtype=self.dtype)


def resolve_kind(kind: str, device: torch.device) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown loader kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    # resident on every device: on CUDA its Triton kernel needs no host work per batch and no extra
    # wheel; DALI stays available as --loader dali and is benchmarked beside it (README, "Loaders").
    return "resident"


def _generator(seed: int, epoch: int, rank: int, stream: int, device="cpu") -> torch.Generator:
    """An independent, reproducible random stream per (seed, epoch, rank, purpose)."""
    state = np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


class Loader:
    """The shared epoch plan; subclasses turn index batches into image batches."""

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        if cfg.batch_size < 1:
            raise ValueError(f"batch size {cfg.batch_size} must be at least 1")
        self.cfg, self.device, self.classes = cfg, device, part.classes
        self.out = cfg.output_spec()
        self.part_size = len(part.labels)
        # Train mode pads every rank to the largest part, so all ranks take the same steps.
        self.num_samples = math.ceil(count / cfg.world_size) if cfg.train else self.part_size
        if self.num_samples == 0:
            raise ValueError("the split is empty for this rank")
        if cfg.train and cfg.drop_last and self.num_samples < cfg.batch_size:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the {self.num_samples} "
                             f"samples per rank; lower --batch-size")
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


@dataclass
class EpochPlan:
    """Everything random about one epoch: per batch only slices of it are taken."""

    order: torch.Tensor  # (n,) int64 indices into the rank's part, in visiting order
    params: AugParams  # one parameter set per position of `order`


class ResidentLoader(Loader):
    """The split on the device as one uint8 tensor; per batch only indexing + one augment call."""

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        super().__init__(part, count, cfg, device)
        self.images = torch.from_numpy(part.images).to(device)
        self.labels = torch.from_numpy(part.labels).to(device)
        self.augment, self.engine = augment_reference, "reference"
        if device.type == "cuda":
            from kernels.triton_augment import augment_triton, triton_available

            if triton_available(device):
                self.augment, self.engine = augment_triton, "triton"
        elif cfg.compile_cpu:
            from kernels.cpu_fused import compiled_engine

            # The label predates the function's name; benchmarks/results record it, so it stays.
            self.augment, self.engine = compiled_engine(), "compiled_explicit"

    def __iter__(self):
        plan = self.plan(self.epoch, self.device)
        labels = self.labels[plan.order]  # one gather per epoch
        params = plan.params
        if self.engine == "triton":  # what the kernel reads, computed for the epoch: a batch is one launch
            from kernels.triton_augment import kernel_params

            params = kernel_params(params, self.out.size, self.device)
        for part in self.batch_slices(self.start_batch):
            yield self.augment(self.images, plan.order[part], params[part], self.out), labels[part]


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
    """Host-resident uint8 split fed through DALI, following the shared epoch plan.

    The plan is drawn with a CPU generator, so on CPU DALI and the resident loader see the
    same draws (tested); on CUDA the resident loader draws on the GPU and they differ.

    The pipeline (a `_DaliPipeline`) counts epochs itself from where it was built, and is rebuilt
    only when asked for an epoch it did not expect (the first one, a resume, or after an epoch
    that was not run to the end).
    """

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        super().__init__(part, count, cfg, device)
        self.images, self.labels = part.images, part.labels
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
        arrays = dali_param_arrays(plan.params, self.images.shape[1:], self.out)  # the whole epoch at once
        for rows in self.batch_slices(start):
            idx = order[rows]
            yield self.images[idx], self.labels[idx], {k: v[rows] for k, v in arrays.items()}

    def __iter__(self):
        from pipeline.dali_augment import dali_iterator

        wanted = (self.epoch, self.start_batch)
        dali = self.dali
        if dali is None or dali.next != wanted:
            dali = self.dali = _DaliPipeline(origin=wanted)
            dali.iterator = dali_iterator(functools.partial(self._epoch_batches, dali), self.out,
                                          self.cfg.batch_size, device_id=self.device_id,
                                          num_threads=max(1, self.cfg.workers), seed=self.cfg.seed)
            self.builds += 1
        dali.next = None
        remaining = len(self) - self.start_batch
        # The training loop breaks right after an epoch's last batch, so nothing after this loop is
        # sure to run: record the hand-over when the last batch goes out. DALI's iterator is then at
        # its epoch's end; the next `for` over it (iter() resets it) continues with the epoch it is
        # already prefetching.
        for i, (images, labels) in enumerate(dali.iterator):
            if i == remaining - 1:  # eval passes do not depend on the epoch: the same pass comes next
                dali.next = (self.epoch + 1, 0) if self.cfg.train else (self.epoch, 0)
            yield images.to(self.device), labels.to(self.device)


class _PilDataset(torch.utils.data.Dataset):
    """Per-image torchvision transforms on PIL images (the baseline's data path)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, cfg: LoaderConfig):
        from torchvision import transforms as T

        self.images, self.labels = images, labels
        mean, std = cfg.output_spec().channel_stats()
        head = [T.Grayscale(cfg.channels), T.Resize(cfg.img_size)]
        aug = [T.RandomHorizontalFlip(), T.RandomRotation(15), T.ColorJitter(0.2, 0.2, 0.2, 0.1)]
        tail = [T.ToTensor(), T.Normalize(mean, std)]
        self.transform = T.Compose(head + (aug if cfg.train else []) + tail)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


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
        dataset = _PilDataset(part.images, part.labels, cfg)
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


def make_loader(data_dir: Path | str, split: str, cfg: LoaderConfig, device: torch.device | str,
                manifest: dict | None = None) -> Loader:
    """Read this rank's part of `split` from the shards and wrap it in the chosen loader kind.

    `manifest`: the parsed manifest.json when the caller has read it already (read once per run)."""
    device = torch.device(device)
    kind = resolve_kind(cfg.kind, device)
    manifest = manifest or load_manifest(data_dir)
    count = manifest["splits"][split]["count"]
    part = read_split(data_dir, split, cfg.rank, cfg.world_size, manifest=manifest)
    cls = {"resident": ResidentLoader, "dali": DaliLoader, "dataloader": TorchDataLoader}[kind]
    loader = cls(part, count, cfg, device)
    loader.kind = kind
    return loader
