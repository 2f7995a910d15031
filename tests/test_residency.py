"""The loader decides what lives where: the budget, auto's choice, describe()'s line, the GPU decoder's logic."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loader_helpers import build, jpeg, png, smooth_images
from pipeline import residency
from pipeline.loaders import DaliLoader, LoaderConfig, ResidentLoader, make_loader, resolve_kind
from pipeline.shards import read_split
from pipeline.stream import StreamLoader


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("residency")
    return {"raw": build(root / "raw"),
            "rgb": build(root / "rgb", storage="encoded", channels=3, shape=(40, 56)),
            "sizes": build(root / "sizes", storage="encoded", channels=3, shape=None)}


def cfg(**kw):
    return LoaderConfig(**{**dict(batch_size=8, compile_cpu=False), **kw})


def test_decoded_bytes():
    assert residency.decoded_bytes({"image_shape": [48, 48], "channels": 1}, 28709, 112) == 28709 * 48 * 48
    assert residency.decoded_bytes({"image_shape": [100, 100], "channels": 3}, 10, 224) == 10 * 100 * 100 * 3
    # encoded images of differing sizes are decoded at the output side
    assert residency.decoded_bytes({"image_shape": None, "channels": 3}, 10, 224) == 10 * 224 * 224 * 3


def test_default_budget_is_half_the_free_memory(monkeypatch):
    monkeypatch.setattr(residency, "host_available", lambda: 8_000_000_000)
    assert residency.default_budget(torch.device("cpu")) == 4_000_000_000
    assert residency.default_budget(torch.device("cpu"), world_size=4) == 1_000_000_000  # ranks share the host
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6_000_000_000, 80_000_000_000))
    assert residency.default_budget(torch.device("cuda:0"), world_size=4) == 3_000_000_000  # one GPU per rank


def test_host_available_reads_meminfo():
    assert residency.host_available() > 0


def test_resolve_kind():
    with pytest.raises(ValueError, match="unknown loader kind"):
        resolve_kind("fast", torch.device("cpu"))
    assert resolve_kind("auto", torch.device("cpu")) == "resident"  # nothing known: resident
    assert resolve_kind("auto", torch.device("cpu"), 100, 1000) == "resident"
    assert resolve_kind("auto", torch.device("cpu"), 1001, 1000) == "stream"
    assert resolve_kind("stream", torch.device("cpu"), 1, 1000) == "stream"
    assert resolve_kind("resident", torch.device("cpu"), 10**12, 1000) == "resident"


def test_human_bytes():
    assert residency.human_bytes(28709 * 48 * 48) == "66 MB"
    assert residency.human_bytes(1.2e9) == "1.2 GB"
    assert residency.human_bytes(92_160) == "92 kB"
    assert residency.human_bytes(12) == "12 B"


def test_auto_under_a_tiny_budget_streams_and_says_so(dirs):
    loader = make_loader(dirs["rgb"], "train", cfg(channels=3, resident_budget=1000), "cpu")
    assert isinstance(loader, StreamLoader) and loader.kind == "stream"
    assert loader.describe() == ("train: 40 images encoded 40x56 RGB, 269 kB decoded > budget 1 kB: streaming, "
                                 "CPU decoder pool x2, engine reference")


def test_auto_within_the_budget_is_resident_and_says_so(dirs, monkeypatch):
    monkeypatch.setattr(residency, "host_available", lambda: 22_400_000_000)
    loader = make_loader(dirs["raw"], "train", cfg(), "cpu")
    assert isinstance(loader, ResidentLoader) and loader.kind == "resident"
    assert loader.describe() == ("train: 40 images raw 48x48 gray, 92 kB decoded, resident on cpu "
                                 "(budget 11.2 GB), engine reference")
    enc = make_loader(dirs["sizes"], "train", cfg(channels=3, img_size=64, resident_budget=10**9), "cpu")
    assert enc.describe() == ("train: 40 images encoded of differing sizes (decoded at 64x64) RGB, 492 kB decoded, "
                              "resident on cpu (budget 1.0 GB), decoded once by the CPU decoder pool x2, "
                              "engine reference")


def test_describe_names_a_forced_kind(dirs):
    line = make_loader(dirs["raw"], "train", cfg(kind="stream", resident_budget=10**9), "cpu").describe()
    assert line == ("train: 40 images raw 48x48 gray, 92 kB decoded (budget 1.0 GB), --loader stream: streaming, "
                    "raw rows read per batch, engine reference")
    line = make_loader(dirs["raw"], "train", cfg(kind="resident", resident_budget=10), "cpu").describe()
    assert "92 kB decoded > budget 10 B, --loader resident: resident on cpu" in line
    line = make_loader(dirs["raw"], "val", cfg(kind="dataloader", workers=0, train=False, resident_budget=10),
                       "cpu").describe()
    assert line.startswith("val: 13 images raw 48x48 gray") and "raw rows read per image" in line


@pytest.mark.parametrize("kind", ["dali", "dataloader"])
def test_host_kinds_read_raw_rows_lazily_over_the_budget(dirs, kind):
    """dali and dataloader keep raw pixels in host memory only when they fit; otherwise rows per batch."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    small = make_loader(dirs["raw"], "train", cfg(kind=kind, workers=0, resident_budget=10), "cpu")
    big = make_loader(dirs["raw"], "train", cfg(kind=kind, workers=0, resident_budget=10**9), "cpu")
    assert small.source.images is None and big.source.images is not None
    if kind == "dali":  # the same draws: identical batches
        for (a, la), (b, lb) in zip(list(small), list(big)):
            assert torch.equal(la, lb) and torch.equal(a, b)
    else:
        assert torch.equal(torch.cat([y for _, y in small]), torch.cat([y for _, y in big]))


def test_colour_data_needs_colour_output(dirs):
    with pytest.raises(ValueError, match="--channels 1"):
        make_loader(dirs["rgb"], "train", cfg(channels=1), "cpu")


def test_open_split_passes_soft_labels_budget_and_the_datas_geometry(tmp_path, monkeypatch):
    from facesense.core.config import TrainConfig
    from facesense.core.data import open_split
    import pipeline.loaders as loaders

    root = build(tmp_path / "votes", storage="encoded", channels=3, shape=(40, 40), votes=True)
    seen = []
    real = loaders.make_loader
    monkeypatch.setattr(loaders, "make_loader", lambda d, s, c, *a, **k: seen.append(c) or real(d, s, c, *a, **k))
    config = TrainConfig(data=str(root), loader="auto", workers=0)
    for name, value in (("soft_labels", True), ("resident_budget_gb", 0.5), ("channels", None), ("img_size", None)):
        setattr(config, name, value)
    open_split(root, "train", config, torch.device("cpu"), train=True, batch_size=8)
    open_split(root, "val", config, torch.device("cpu"), train=False, batch_size=8)
    train, val = seen
    assert train.soft_labels and not val.soft_labels  # val and eval score the majority label
    assert train.resident_budget == 500_000_000 and (train.channels, train.img_size) == (3, 40)
    config.resident_budget_gb = 0.0
    open_split(root, "val", config, torch.device("cpu"), train=False, batch_size=8)
    assert seen[-1].resident_budget is None  # 0 = auto


def test_nvjpeg_decoder_logic_on_the_cpu(tmp_path):
    """NvjpegDecoder's batching, PNG fallback and GPU-side resize, run with torchvision's CPU decoder."""
    from pipeline.decode import DecodePool, decode_image
    from pipeline.gpu_decode import NvjpegDecoder, is_jpeg

    rng = np.random.default_rng(1)
    images = smooth_images(rng, 6, [(48, 48), (48, 48), (60, 40), (48, 48), (30, 30), (60, 40)], 3)
    blobs = [jpeg(x) if i % 2 == 0 else png(x) for i, x in enumerate(images)]
    assert [is_jpeg(b) for b in blobs] == [True, False, True, False, True, False]
    decoder = NvjpegDecoder(torch.device("cpu"), DecodePool(2))
    for channels in (1, 3):
        got = decoder.decode_batch(blobs, channels, (48, 48)).numpy().astype(int)
        want = np.stack([decode_image(b, channels, (48, 48)) for b in blobs]).astype(int)
        assert got.shape == want.shape == ((6, 48, 48) if channels == 1 else (6, 48, 48, 3))
        assert (got[1::2] == want[1::2]).all()  # PNGs: the CPU pool, exact
        assert np.abs(got[0] - want[0]).max() <= 3  # libjpeg builds and gray conversions differ a little
        assert np.abs(got[::2] - want[::2]).mean() <= 2  # resized JPEGs: torch's antialiased bilinear vs Pillow's
    assert decoder.cpu_fallbacks == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_stream_without_dali_uses_nvjpeg(dirs, monkeypatch, tmp_path):
    import pipeline.loaders as loaders

    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    root = build(tmp_path / "jpg", storage="encoded", channels=3, shape=(40, 56), encoder=jpeg)
    loader = make_loader(root, "val", cfg(kind="stream", channels=3, train=False), "cuda")
    assert isinstance(loader, StreamLoader) and "nvJPEG" in loader.describe()
    images = torch.cat([x for x, _ in loader])
    ref = make_loader(root, "val", cfg(kind="resident", channels=3, train=False), "cuda")
    want = torch.cat([x for x, _ in ref])
    assert ((images.float() - want.float()).abs() * 0.25).mean() <= 3 / 255
    assert loader.decoder.cpu_fallbacks == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_stream_with_dali_uses_dali(dirs):
    pytest.importorskip("nvidia.dali")
    loader = make_loader(dirs["rgb"], "val", cfg(kind="stream", channels=3, train=False), "cuda")
    assert isinstance(loader, DaliLoader) and loader.kind == "stream" and "mixed" in loader.describe()
    images = torch.cat([x for x, _ in loader])
    assert images.is_cuda and images.shape == (13, 3, 48, 48)
    assert len(read_split(dirs["rgb"], "val").labels) == 13
