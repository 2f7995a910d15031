"""Every loader kind on raw gray, raw colour, encoded gray/colour and encoded images of differing sizes:
stream == resident batches, eval mode == the reference on the decoded pixels, soft targets, the
prefetch thread's lifetime, and what the stream loader keeps in memory."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from kernels.reference import augment_reference
from kernels.spec import AugConfig, identity_params
from loader_helpers import LAYOUTS, build, decoded_split, jpeg
from pipeline.errors import ShardError
from pipeline.loaders import LoaderConfig, make_loader
from pipeline.shards import read_split
from pipeline.stream import Prefetcher, StreamLoader
from pipeline.targets import soft_targets

AUG = AugConfig(erase_p=0.5, saturation=0.2)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    name = request.param
    return name, build(tmp_path_factory.mktemp(name), votes=True, **LAYOUTS[name])


def config(name, **kw):
    channels = 3 if "rgb" in name or "sizes" in name else 1
    base = dict(batch_size=8, img_size=48, channels=channels, compile_cpu=False, workers=2)
    return LoaderConfig(**{**base, **kw})


def batches(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    return list(loader)


def test_stream_equals_resident(layout):
    name, root = layout
    cfg = config(name, aug=AUG, drop_last=False)
    resident = make_loader(root, "train", LoaderConfig(**{**cfg.__dict__, "kind": "resident"}), "cpu")
    stream = make_loader(root, "train", LoaderConfig(**{**cfg.__dict__, "kind": "stream"}), "cpu")
    assert isinstance(stream, StreamLoader) and stream.kind == "stream"
    for epoch, start in ((0, 0), (1, 2)):  # a second epoch, resumed mid-way
        a, b = batches(resident, epoch, start), batches(stream, epoch, start)
        assert len(a) == len(b) == len(resident) - start
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)
            assert xa.shape == xb.shape and torch.allclose(xa, xb, atol=1e-5)


@pytest.mark.parametrize("kind", ["resident", "stream", "dataloader", "dali"])
def test_eval_mode_is_the_reference_on_the_decoded_pixels(layout, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    name, root = layout
    cfg = config(name, kind=kind, train=False, workers=1)
    loader = make_loader(root, "val", cfg, "cpu")
    got = list(loader)
    images = torch.cat([x for x, _ in got])
    labels = torch.cat([y for _, y in got])
    assert torch.equal(labels, torch.from_numpy(read_split(root, "val").labels))
    pixels = torch.from_numpy(decoded_split(root, "val", 48))
    want = augment_reference(pixels, torch.arange(len(pixels)), identity_params(len(pixels)), cfg.output_spec())
    assert images.shape == want.shape == (13, cfg.channels, 48, 48)
    err = (images.float() - want.float()).abs() * cfg.std[0]  # on the [0, 1] scale
    resized = LAYOUTS[name]["shape"] != (48, 48)
    if kind == "dali" and name == "encoded-sizes":  # DALI warps each file from its own size in one pass
        assert err.mean() <= 4 / 255
    elif kind == "dataloader" and resized:  # torchvision's Resize (antialiased) vs the spec's one sampling pass
        assert err.mean() <= 1 / 255 and err.max() <= 8 / 255
    elif kind in ("dali", "dataloader"):
        assert err.max() <= 2 / 255 + 1e-6
    else:
        assert err.max() <= 1e-5


@pytest.mark.parametrize("kind", ["resident", "stream", "dataloader", "dali"])
def test_train_batches_every_kind(layout, kind):
    """Train mode: the shapes and dtypes, every sample once per epoch, the same targets as resident."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    name, root = layout
    cfg = config(name, kind=kind, aug=AUG, drop_last=False, workers=1)
    loader = make_loader(root, "train", cfg, "cpu")
    loader.set_epoch(0)
    order = torch.cat(loader.index_batches())
    got = list(loader)
    assert all(x.shape[1:] == (cfg.channels, 48, 48) and x.dtype == torch.float32 for x, _ in got)
    labels = torch.cat([y for _, y in got])
    assert torch.equal(labels, torch.from_numpy(read_split(root, "train").labels)[order])


@pytest.mark.parametrize("kind", ["resident", "stream", "dataloader", "dali"])
def test_soft_targets_same_order_as_labels(layout, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    name, root = layout
    part = read_split(root, "train")
    want = torch.from_numpy(soft_targets(part.votes, part.labels, part.classes))
    assert want.shape == (40, 8) and torch.allclose(want.sum(1), torch.ones(40))
    hard = make_loader(root, "train", config(name, kind=kind, workers=1), "cpu")
    soft = make_loader(root, "train", config(name, kind=kind, workers=1, soft_labels=True), "cpu")
    hard.set_epoch(0)
    order = torch.cat(hard.index_batches())
    soft_y = torch.cat([y for _, y in batches(soft)])
    hard_y = torch.cat([y for _, y in batches(hard)])
    assert soft_y.dtype == torch.float32 and soft_y.shape == (len(order), 8)
    assert torch.allclose(soft_y, want[order])
    assert torch.equal(hard_y, torch.from_numpy(part.labels)[order])


def test_soft_target_rule():
    votes = np.array([[6, 1, 2, 0, 0, 0, 0, 0, 1, 0],  # the 1 vote is an outlier: 6 / 8, 2 / 8
                      [0, 0, 0, 0, 0, 0, 0, 0, 9, 1]], np.uint8)  # no emotion vote left: the label, one-hot
    labels = np.array([0, 3])
    classes = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
    got = soft_targets(votes, labels, classes)
    assert np.allclose(got[0], [0.75, 0, 0.25, 0, 0, 0, 0, 0]) and np.allclose(got[1], np.eye(8)[3])
    with pytest.raises(ValueError, match="--ferplus"):
        soft_targets(None, labels, classes)


def test_soft_labels_without_votes_is_an_error(tmp_path):
    root = build(tmp_path / "novotes")
    with pytest.raises(ValueError, match="pack with --ferplus"):
        make_loader(root, "train", config("raw-gray", soft_labels=True), "cpu")


def test_encoded_equals_raw_pack_of_the_same_pixels(tmp_path):
    raw = build(tmp_path / "raw", storage="raw", channels=3, shape=(40, 56))
    enc = build(tmp_path / "enc", storage="encoded", channels=3, shape=(40, 56))
    cfg = config("rgb", kind="resident", aug=AUG)
    for (a, la), (b, lb) in zip(batches(make_loader(raw, "train", cfg, "cpu")),
                                batches(make_loader(enc, "train", LoaderConfig(**{**cfg.__dict__, "kind": "stream"}),
                                                    "cpu"))):
        assert torch.equal(la, lb) and torch.allclose(a, b, atol=1e-5)


def test_jpeg_stream_matches_pillow_decode(tmp_path):
    root = build(tmp_path / "jpeg", storage="encoded", channels=3, shape=(48, 48), encoder=jpeg)
    cfg = config("rgb", kind="stream", train=False)
    images = torch.cat([x for x, _ in make_loader(root, "val", cfg, "cpu")])
    pixels = torch.from_numpy(decoded_split(root, "val", 48))
    want = augment_reference(pixels, torch.arange(13), identity_params(13), cfg.output_spec())
    assert torch.allclose(images, want, atol=1e-5)


def test_prefetch_thread_stops_when_an_epoch_is_cut_short(tmp_path):
    root = build(tmp_path / "cut", storage="encoded", channels=3, shape=(40, 56))
    loader = make_loader(root, "train", config("rgb", kind="stream"), "cpu")
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    thread = loader.prefetcher.thread
    it.close()  # what a `break` out of the training loop does to the generator
    assert not thread.is_alive()
    it = iter(loader)
    next(it)
    thread = loader.prefetcher.thread
    del it  # an epoch abandoned without close(): the generator's finally runs when it is collected
    gc.collect()
    assert not thread.is_alive()
    batches(loader)  # a full epoch: its thread is gone at the end too
    assert not loader.prefetcher.thread.is_alive()
    loader.close()


def test_prefetch_thread_stops_when_the_loop_breaks_after_the_last_batch(tmp_path):
    root = build(tmp_path / "brk")
    loader = make_loader(root, "train", config("raw-gray", kind="stream"), "cpu")
    loader.set_epoch(0)
    for i, _ in enumerate(loader):
        if i + 1 >= len(loader):
            break  # the training loop's pattern: StopIteration is never reached
    assert not loader.prefetcher.thread.is_alive()


def test_prefetcher_hands_errors_to_the_consumer_and_stops():
    def load(i):
        if i == 3:
            raise RuntimeError("boom")
        return i

    p = Prefetcher(load, range(10), depth=2)
    with pytest.raises(RuntimeError, match="boom"):
        list(p)
    p.close()
    assert not p.thread.is_alive()
    p = Prefetcher(lambda i: i, range(100), depth=2)  # a producer blocked on a full queue
    assert next(iter(p)) == 0
    p.close()
    assert not p.thread.is_alive()


def test_a_file_that_does_not_decode_is_a_one_line_error(tmp_path):
    root = build(tmp_path / "bad", storage="encoded", channels=1, corrupt=5)
    loader = make_loader(root, "train", config("raw-gray", kind="stream", train=False), "cpu")
    with pytest.raises(ShardError, match="does not decode"):
        list(loader)
    assert not loader.prefetcher.thread.is_alive()


def _arrays(obj, seen=None, depth=0):
    """Every numpy array / tensor reachable from obj's attributes (a few levels deep)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return []
    seen.add(id(obj))
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return [obj]
    found = []
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        vars(obj).values() if hasattr(obj, "__dict__") and not isinstance(obj, type) else []
    for value in values:
        found += _arrays(value, seen, depth + 1)
    return found


@pytest.mark.parametrize("name", ["raw-gray", "encoded-rgb", "encoded-sizes"])
def test_stream_loader_holds_no_copy_of_the_split(tmp_path, name):
    counts = {"train": 200, "val": 13, "test": 0}
    root = build(tmp_path / name, counts=counts, votes=True, **LAYOUTS[name])
    loader = make_loader(root, "train", config(name, kind="stream", soft_labels=True), "cpu")
    batches(loader)
    per_image = 48 * 48 * (3 if name != "raw-gray" else 1)
    held = _arrays(loader)
    sizes = [a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size() for a in held]
    # Labels, soft targets (8 float32 per image) and shapes stay: bytes per image, not pixels. Nothing
    # near the split's decoded size (200 images) is kept, only a batch or two in flight.
    decoded = 200 * per_image
    assert sum(sizes) < decoded / 10 and loader.part_size == 200
    for reader in (loader.encoded, loader.rows):
        if reader is not None:
            assert set(vars(reader)) <= {"data_dir", "split", "dataset", "_walk", "_starts", "_count", "_files",
                                         "shapes"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["raw-gray", "encoded-rgb", "encoded-sizes"])
def test_gpu_stream_matches_resident(tmp_path, name):
    root = build(tmp_path / name, **LAYOUTS[name], encoder=jpeg) if "encoded" in name else \
        build(tmp_path / name, **LAYOUTS[name])
    cfg = config(name, train=False)
    resident = torch.cat([x for x, _ in make_loader(root, "val", LoaderConfig(**{**cfg.__dict__, "kind": "resident"}),
                                                     "cuda")])
    loader = make_loader(root, "val", LoaderConfig(**{**cfg.__dict__, "kind": "stream"}), "cuda")
    stream = torch.cat([x for x, _ in loader])
    assert stream.is_cuda and stream.shape == resident.shape
    # nvJPEG / DALI vs Pillow's libjpeg, and GPU resizes, differ by a few levels
    assert ((stream.float() - resident.float()).abs() * cfg.std[0]).mean() <= 4 / 255
    print(loader.describe())


def test_stream_uses_the_resident_loaders_compiled_engine_on_cpu(tmp_path):
    root = build(tmp_path / "compiled", storage="encoded", channels=1, shape=(48, 48))
    cfg = config("encoded-gray", kind="stream", aug=AUG, compile_cpu=True)
    fast = make_loader(root, "train", cfg, "cpu")
    ref = make_loader(root, "train", LoaderConfig(**{**cfg.__dict__, "kind": "resident", "compile_cpu": False}), "cpu")
    assert fast.engine == "compiled_explicit" and "engine compiled_explicit" in fast.describe()
    for (a, la), (b, lb) in zip(batches(fast), batches(ref)):
        assert torch.equal(la, lb) and (a - b).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["raw-rgb", "encoded-rgb", "encoded-sizes"])
def test_dali_matches_resident_for_the_same_draws(tmp_path, name):
    """DALI decodes (encoded) and augments with the plan's draws: the resident loader's batches, to rounding."""
    pytest.importorskip("nvidia.dali")
    root = build(tmp_path / name, **LAYOUTS[name])
    cfg = config(name, aug=AUG)
    resident = make_loader(root, "train", LoaderConfig(**{**cfg.__dict__, "kind": "resident"}), "cpu")
    dali = make_loader(root, "train", LoaderConfig(**{**cfg.__dict__, "kind": "dali"}), "cpu")
    for epoch in (0, 1):
        for (a, la), (b, lb) in zip(batches(resident, epoch), batches(dali, epoch)):
            assert torch.equal(la, lb)
            err = (a.float() - b.float()).abs() * cfg.std[0]
            if name == "encoded-sizes":  # DALI warps each file from its own size; resident resized it first
                assert err.mean() <= 4 / 255
            else:
                assert err.max() <= 2 / 255 and err.mean() <= 0.5 / 255


def test_stream_compiled_engine_on_colour(tmp_path):
    root = build(tmp_path / "rgb", **LAYOUTS["encoded-rgb"])
    cfg = config("encoded-rgb", kind="stream", aug=AUG, compile_cpu=True)
    fast = make_loader(root, "train", cfg, "cpu")
    ref = make_loader(root, "train", LoaderConfig(**{**cfg.__dict__, "kind": "resident", "compile_cpu": False}), "cpu")
    for (a, la), (b, lb) in zip(batches(fast), batches(ref)):
        assert torch.equal(la, lb) and (a - b).abs().max() <= 1e-3
