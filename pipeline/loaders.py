"""Loaders: (images, labels) batches already on the training device, one interface, three kinds.

* resident   - the split lives on the device as one uint8 tensor; a batch is an index
               into it plus one augmentation call (fused Triton kernel on CUDA; on CPU
               the reference's math compiled into one loop by torch.compile, or the
               reference itself with compile_cpu=False). No workers, no host copies.
* dali       - the same draws fed through the DALI pipeline (`pipeline/dali_augment.py`).
* dataloader - torch DataLoader + torchvision per-image PIL transforms, as the project we
               grow from did. Kept as the baseline every speed claim is compared with.
* auto       - dali on CUDA when DALI is installed, resident otherwise (see README for
               why and for the measurements).

All kinds share the epoch plan below, so they visit the same samples in the same
order for a given (seed, epoch, rank): seeded per-epoch shuffling; DDP ranks read
disjoint contiguous parts of the split; in train mode every rank is padded to the
same sample count (so every rank runs the same number of steps); eval mode visits
every sample of the rank's part exactly once, in order, with a partial last batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kernels.reference import augment_reference
from kernels.spec import AugConfig, OutputSpec, identity_params, sample_params
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
    compile_cpu: bool = True  # resident on CPU: torch.compile the fused engine (first batch ~10 s per shape)

    def output_spec(self) -> OutputSpec:
        return OutputSpec(size=self.img_size, channels=self.channels, mean=tuple(self.mean),
                          std=tuple(self.std), dtype=self.dtype)


def resolve_kind(kind: str, device: torch.device) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown loader kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    if device.type == "cuda":
        try:
            import nvidia.dali  # noqa: F401
            return "dali"
        except ImportError:
            pass
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

    def index_batches(self, epoch: int | None = None, device=None) -> list[torch.Tensor]:
        order = self.epoch_order(epoch).to(device or "cpu")  # one copy per epoch, views per batch
        b = self.cfg.batch_size
        return [order[i * b:(i + 1) * b] for i in range(len(self))]


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
            from kernels.cpu_fused import compiled_explicit

            self.augment, self.engine = compiled_explicit(), "compiled_explicit"

    def __iter__(self):
        params_gen = _generator(self.cfg.seed, self.epoch, self.cfg.rank, 1, self.device)
        for i, idx in enumerate(self.index_batches(device=self.device)):
            params = (sample_params(len(idx), self.cfg.aug, params_gen) if self.cfg.train
                      else identity_params(len(idx), self.device))
            if i < self.start_batch:
                continue  # drawn but skipped: a resumed epoch sees the same draws after this
            yield self.augment(self.images, idx, params, self.out), self.labels[idx]


class DaliLoader(Loader):
    """Host-resident uint8 split fed through DALI with the same draws as the resident loader.

    DALI asks its source for an epoch ahead of use (prefetch, and again at each reset),
    before the training loop calls set_epoch. So the pipeline counts epochs itself from
    where it was built, and is rebuilt only when asked for an epoch it did not expect
    (the first one, a resume, or after an epoch that was not run to the end).
    """

    def __init__(self, part: SplitArrays, count: int, cfg: LoaderConfig, device: torch.device):
        super().__init__(part, count, cfg, device)
        self.images, self.labels = part.images, part.labels
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        self.dali, self._next, self._origin, self._calls = None, None, (0, 0), 0

    def _epoch_batches(self):
        epoch, start = self._origin
        epoch, start = epoch + self._calls, (start if self._calls == 0 else 0)
        self._calls += 1
        params_gen = _generator(self.cfg.seed, epoch, self.cfg.rank, 1)
        for i, idx in enumerate(self.index_batches(epoch)):
            params = (sample_params(len(idx), self.cfg.aug, params_gen) if self.cfg.train
                      else identity_params(len(idx)))
            if i >= start:
                idx_np = idx.numpy()
                yield self.images[idx_np], self.labels[idx_np], params

    def __iter__(self):
        from pipeline.dali_augment import dali_iterator

        wanted = (self.epoch, self.start_batch)
        if self.dali is None or self._next != wanted:
            self._origin, self._calls = wanted, 0
            self.dali = dali_iterator(self._epoch_batches, self.out, self.cfg.batch_size,
                                      device_id=self.device_id, num_threads=max(1, self.cfg.workers),
                                      seed=self.cfg.seed)
        self._next = None
        for images, labels in self.dali:
            yield images.to(self.device), labels.to(self.device)
        self._next = (self.epoch + 1, 0)  # what DALI is already prefetching


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

    def __iter__(self):
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield images.to(dtype=self.cfg.dtype, memory_format=torch.channels_last), labels.to(self.device)


def make_loader(data_dir: Path | str, split: str, cfg: LoaderConfig, device: torch.device | str) -> Loader:
    """Read this rank's part of `split` from the shards and wrap it in the chosen loader kind."""
    device = torch.device(device)
    kind = resolve_kind(cfg.kind, device)
    count = load_manifest(data_dir)["splits"][split]["count"]
    part = read_split(data_dir, split, cfg.rank, cfg.world_size)
    cls = {"resident": ResidentLoader, "dali": DaliLoader, "dataloader": TorchDataLoader}[kind]
    loader = cls(part, count, cfg, device)
    loader.kind = kind
    return loader
