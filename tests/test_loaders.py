"""Loaders: epoch plan, DDP sharding, eval mode, and the kinds agreeing with each other."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.reference import augment_reference
from kernels.spec import AugConfig, identity_params
from pipeline.loaders import LoaderConfig, make_loader, resolve_kind
from train_helpers import write_shards

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def make_shards(root, n_train=50, n_val=23, shard_size=16):
    """Tiny shards whose image i carries its own id in pixels [0, 0] and [0, 1]."""
    rng = np.random.default_rng(0)
    splits = {}
    offset = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", 0)):
        images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
        ids = np.arange(offset, offset + n)
        images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
        labels = (ids % len(CLASSES)).astype(np.uint8)
        splits[split] = images, labels, [str(i) for i in ids]
        offset += n
    return write_shards(root, splits, CLASSES, shard_size)


def decode_ids(images: torch.Tensor, cfg: LoaderConfig) -> list[int]:
    """Recover the ids of un-augmented 48 px outputs (eval mode)."""
    raw = ((images[:, 0].float() * cfg.std[0] + cfg.mean[0]) * 255).round().long()
    return (raw[:, 0, 0] * 256 + raw[:, 0, 1]).tolist()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("loaders") / "shards")


def epoch_labels(loader, epoch=0):
    loader.set_epoch(epoch)
    return torch.cat([labels for _, labels in loader])


@pytest.mark.parametrize("kind", ["resident", "dali", "dataloader"])
def test_eval_mode_every_sample_once_in_order_unaugmented(shards, kind):
    cfg = LoaderConfig(kind=kind, batch_size=8, train=False, workers=1, compile_cpu=False)
    loader = make_loader(shards, "val", cfg, "cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and len(batches[-1][1]) == 23 - 16  # partial last batch
    ids = sum((decode_ids(x, cfg) for x, _ in batches), [])
    from pipeline.shards import read_split
    expected = [int(i) for i in read_split(shards, "val", with_ids=True).ids]
    assert ids == expected  # every sample once, in shard order
    images = torch.cat([x for x, _ in batches])
    data = read_split(shards, "val")
    ref = augment_reference(torch.from_numpy(data.images), torch.arange(23), identity_params(23), cfg.output_spec())
    assert torch.allclose(images.float(), ref.float(), atol=1e-4)


@pytest.mark.parametrize("kind", ["resident", "dali", "dataloader"])
def test_train_epoch_visits_every_sample_once(shards, kind):
    cfg = LoaderConfig(kind=kind, batch_size=8, drop_last=False, workers=1, compile_cpu=False)
    loader = make_loader(shards, "train", cfg, "cpu")
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        order = torch.cat(loader.index_batches())
        assert sorted(order.tolist()) == list(range(50))
        labels = epoch_labels(loader, epoch)
        assert len(labels) == 50
        from pipeline.shards import read_split
        expected = torch.from_numpy(read_split(shards, "train").labels)
        assert torch.equal(labels, expected[order])


def test_shuffling_is_seeded_per_epoch(shards):
    def order(seed, epoch):
        loader = make_loader(shards, "train", LoaderConfig(kind="resident", batch_size=8, seed=seed,
                                                           compile_cpu=False), "cpu")
        loader.set_epoch(epoch)
        return torch.cat(loader.index_batches()).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_same_seed_same_batches(shards):
    def first_batch(seed):
        loader = make_loader(shards, "train", LoaderConfig(kind="resident", batch_size=8, seed=seed,
                                                           aug=AugConfig(erase_p=0.5), compile_cpu=False), "cpu")
        loader.set_epoch(3)
        return next(iter(loader))

    (a, la), (b, lb), (c, _) = first_batch(7), first_batch(7), first_batch(8)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_parts_disjoint_covering_same_batch_count(shards, world_size):
    eval_ids, train_lens, train_orders = [], set(), []
    for rank in range(world_size):
        common = dict(kind="resident", batch_size=4, rank=rank, world_size=world_size, compile_cpu=False)
        ev = make_loader(shards, "train", LoaderConfig(train=False, **common), "cpu")
        eval_ids.append(sum((decode_ids(x, ev.cfg) for x, _ in ev), []))
        tr = make_loader(shards, "train", LoaderConfig(drop_last=False, **common), "cpu")
        train_lens.add(len(tr))
        tr.set_epoch(0)
        assert sorted(set(torch.cat(tr.index_batches()).tolist())) == list(range(tr.part_size))
    flat = sum(eval_ids, [])
    assert sorted(flat) == list(range(50))  # disjoint and covering
    assert max(map(len, eval_ids)) - min(map(len, eval_ids)) <= 1  # balanced
    assert len(train_lens) == 1  # every rank takes the same number of steps


def test_resume_mid_epoch_gives_the_same_remaining_batches(shards):
    cfg = LoaderConfig(kind="resident", batch_size=8, aug=AugConfig(erase_p=0.5), compile_cpu=False)
    full = make_loader(shards, "train", cfg, "cpu")
    full.set_epoch(2)
    batches = list(full)
    resumed = make_loader(shards, "train", cfg, "cpu")
    resumed.set_epoch(2, start_batch=3)
    rest = list(resumed)
    assert len(rest) == len(batches) - 3
    for (a, la), (b, lb) in zip(batches[3:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_dali_matches_resident_for_the_same_draws(shards):
    pytest.importorskip("nvidia.dali")
    common = dict(batch_size=8, img_size=64, channels=3, aug=AugConfig(erase_p=0.5), compile_cpu=False)
    resident = make_loader(shards, "train", LoaderConfig(kind="resident", **common), "cpu")
    dali = make_loader(shards, "train", LoaderConfig(kind="dali", **common), "cpu")
    std = torch.tensor(resident.out.channel_stats()[1]).view(1, 3, 1, 1)
    for epoch in (0, 1):  # the second epoch checks DALI's own epoch counting
        resident.set_epoch(epoch)
        dali.set_epoch(epoch)
        for (a, la), (b, lb) in zip(resident, dali):
            assert torch.equal(la, lb)
            err = ((a.float() - b.float()) * std).abs()  # on the [0, 1] scale
            assert err.max() <= 2 / 255 and err.mean() <= 0.5 / 255


def test_dali_loader_restarts_cleanly_after_a_partial_epoch(shards):
    pytest.importorskip("nvidia.dali")
    cfg = LoaderConfig(kind="dali", batch_size=8, compile_cpu=False)
    loader = make_loader(shards, "train", cfg, "cpu")
    loader.set_epoch(0)
    next(iter(loader))  # abandon epoch 0 after one batch
    reference = make_loader(shards, "train", LoaderConfig(kind="resident", batch_size=8, compile_cpu=False), "cpu")
    assert torch.equal(epoch_labels(loader, 1), epoch_labels(reference, 1))


def test_compiled_cpu_engine_is_used_and_matches_reference(shards):
    cfg = LoaderConfig(kind="resident", batch_size=8, aug=AugConfig(erase_p=0.5))
    fast = make_loader(shards, "train", cfg, "cpu")
    slow = make_loader(shards, "train", LoaderConfig(**{**cfg.__dict__, "compile_cpu": False}), "cpu")
    assert fast.engine == "compiled_explicit" and slow.engine == "reference"
    fast.set_epoch(0)
    slow.set_epoch(0)
    (a, la), (b, lb) = next(iter(fast)), next(iter(slow))
    assert torch.equal(la, lb)
    assert (a - b).abs().max() <= 1e-3


def test_errors(shards):
    with pytest.raises(ValueError, match="unknown loader kind"):
        resolve_kind("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="larger than"):
        make_loader(shards, "train", LoaderConfig(kind="resident", batch_size=64), "cpu")
    with pytest.raises(ValueError, match="empty"):
        make_loader(shards, "test", LoaderConfig(kind="resident", batch_size=4, train=False), "cpu")


def test_auto_is_resident_on_cpu():
    assert resolve_kind("auto", torch.device("cpu")) == "resident"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["resident", "dali", "dataloader"])
def test_gpu_loaders_return_cuda_channels_last(shards, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = LoaderConfig(kind=kind, batch_size=8, img_size=112, channels=3, dtype=torch.float16, workers=1)
    loader = make_loader(shards, "train", cfg, "cuda")
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda
    assert images.shape == (8, 3, 112, 112) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last)


def run_like_training(loader, epochs):
    """The training loop's pattern: break right after the epoch's last batch (never reach StopIteration)."""
    labels = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for i, (_, y) in enumerate(loader):
            labels.append(y)
            if i + 1 >= len(loader):
                break
    return torch.cat(labels)


def test_dali_loader_builds_one_pipeline_across_epochs(shards):
    pytest.importorskip("nvidia.dali")
    cfg = dict(batch_size=8, compile_cpu=False)
    dali = make_loader(shards, "train", LoaderConfig(kind="dali", **cfg), "cpu")
    resident = make_loader(shards, "train", LoaderConfig(kind="resident", **cfg), "cpu")
    assert torch.equal(run_like_training(dali, 3), run_like_training(resident, 3))
    assert dali.builds == 1


def test_train_with_dali_loader_builds_one_pipeline(tmp_path, monkeypatch):
    """Three epochs of facesense train --loader dali: one pipeline, not one per epoch."""
    pytest.importorskip("nvidia.dali")
    from train_helpers import make_shards as make_train_shards, train_args
    from typer.testing import CliRunner

    from facesense.cli import app
    from pipeline import dali_augment

    built = []
    real = dali_augment.dali_iterator
    monkeypatch.setattr(dali_augment, "dali_iterator", lambda *a, **k: built.append(1) or real(*a, **k))
    data = make_train_shards(tmp_path / "shards")
    args = train_args(data, tmp_path / "run", "--epochs", "3", "--loader", "dali")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    assert len(built) == 2  # one for train (all three epochs), one for val


def test_epoch_parameters_are_drawn_once_per_epoch(shards, monkeypatch):
    import pipeline.loaders as loaders

    calls = []
    real = loaders.sample_params
    monkeypatch.setattr(loaders, "sample_params", lambda n, *a, **k: calls.append(n) or real(n, *a, **k))
    loader = make_loader(shards, "train", LoaderConfig(kind="resident", batch_size=8, compile_cpu=False), "cpu")
    loader.set_epoch(0)
    assert len(list(loader)) == len(loader) == 6
    assert calls == [50]  # one draw for the whole epoch (50 samples), not one per batch


def test_triton_loader_path_matches_reference(shards, monkeypatch):
    """The resident loader's Triton path (epoch KernelParams, sliced per batch) equals the reference engine."""
    from kernels import triton_augment

    if not triton_augment.triton_available("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1 set before import (tests/conftest.py sets it)")
    cfg = LoaderConfig(kind="resident", batch_size=8, img_size=56, channels=3, aug=AugConfig(erase_p=0.5),
                       compile_cpu=False)
    reference = make_loader(shards, "train", cfg, "cpu")
    fast = make_loader(shards, "train", cfg, "cpu")
    fast.augment, fast.engine = triton_augment.augment_triton, "triton"  # what CUDA selects
    for loader in (reference, fast):
        loader.set_epoch(1, start_batch=2)
    for (a, la), (b, lb) in zip(reference, fast):
        assert torch.equal(la, lb)
        assert (a.float() - b.float()).abs().max() <= 2 / 255 / 0.25 + 1e-6
