"""Every fast augmentation engine against the pure-torch reference (the spec), one harness.

An engine is a name, a function (images (N, H, W) uint8, index (B,), AugParams, OutputSpec)
-> (B, C, S, S), the device it runs on and a skip reason where it cannot run here. The tests
below run each engine on the same inputs; what only one engine has (the Triton kernel's
input checks, DALI's iterator, the compiled CPU engine's buffers) is tested in its own file,
with the helpers defined here.

Without a GPU the Triton kernel runs in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any import) and DALI on CPU (device_id=None): slow, so batches
are small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu_fused import augment_eager
from kernels.reference import augment_reference
from kernels.spec import AugConfig, AugParams, OutputSpec, erase_box, identity_params, sample_params
from kernels.triton_augment import augment_triton, triton_available
from pipeline import dali_augment

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_ERR, MEAN_ERR = 2 / 255, 0.5 / 255  # on the [0, 1] scale, before normalising
DALI_BATCH = 8  # the DALI pipeline's batch size (the maximum per run)
# "Exact" for the Triton kernel in float32: source coordinates near pixel 47 carry ~4e-6 of
# rounding, and undoing the normalisation adds a little more; 1e-5 is 0.003/255.
EXACT = 1e-5


# ----------------------------------------------------------------------------- helpers

def random_images(n=10, h=48, w=48, seed=0, device="cpu") -> torch.Tensor:
    # Random noise is the hardest case for interpolation: neighbours differ by up to 255.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w), dtype=torch.uint8, generator=g).to(device)


def output_spec(size: int, channels: int, dtype=torch.float32) -> OutputSpec:
    if channels == 3:  # distinct per-channel stats, so a channel mix-up shows
        return OutputSpec(size=size, channels=3, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), dtype=dtype)
    return OutputSpec(size=size, channels=1, mean=(0.5,), std=(0.25,), dtype=dtype)


def unit_scale(x: torch.Tensor, out: OutputSpec) -> torch.Tensor:
    """Undo the normalisation: (B, C, S, S) back to [0, 1] intensities in float32."""
    mean, std = out.channel_stats()
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.float() * std + mean


def assert_close(got: torch.Tensor, want: torch.Tensor, out: OutputSpec, max_err=MAX_ERR,
                 mean_err=MEAN_ERR) -> torch.Tensor:
    """Shape, dtype and channels-last layout as the spec says; errors on the [0, 1] scale bounded."""
    assert got.shape == want.shape == (want.shape[0], out.channels, out.size, out.size)
    assert got.dtype == want.dtype == out.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    err = (unit_scale(got, out) - unit_scale(want, out)).abs()
    assert err.max().item() <= max_err, f"max abs err {err.max().item() * 255:.4f}/255"
    assert err.mean().item() <= mean_err, f"mean abs err {err.mean().item() * 255:.4f}/255"
    return err


def box_mask(box: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) boxes [x0, y0, x1, y1) -> (B, size, size) bool, True inside."""
    x0, y0, x1, y1 = (box[:, k].view(-1, 1, 1) for k in range(4))
    xs, ys = torch.arange(size).view(1, 1, -1), torch.arange(size).view(1, -1, 1)
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def dali_batches(images, labels, params, batch=DALI_BATCH) -> list:
    """(images, labels, params) rows in batches of at most `batch`: a source for dali_iterator."""
    return [(images[i:i + batch], labels[i:i + batch], params[i:i + batch])
            for i in range(0, len(images), batch)]


def run_dali(images, index, params, out: OutputSpec, device_id=None) -> torch.Tensor:
    """images[index] through the loaders' own DALI path (dali_iterator), batches concatenated."""
    picked = images[index]
    labels = torch.zeros(len(params), dtype=torch.long)
    loader = dali_augment.dali_iterator(dali_batches(picked, labels, params), out, DALI_BATCH,
                                        device_id=device_id)
    return torch.cat([x for x, _ in loader]).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- the engines

@dataclass(frozen=True)
class Engine:
    name: str
    run: Callable[[torch.Tensor, torch.Tensor, AugParams, OutputSpec], torch.Tensor]
    device: str  # where its images and indices live (its output comes back there)
    exact: float  # max abs error ([0, 1] scale) where no interpolation error is expected
    # Half dtypes: the largest fraction of values allowed to differ from the reference. Both
    # round float32 to nearest even, so only values whose float32 inputs differ by a hair across
    # a rounding boundary disagree (~1%); truncation would be ~50%. None: not held to it (DALI
    # rounds from its own float32 pipeline, ~8% differ, within the error bounds).
    half_mismatch: float | None
    batch: int = 8  # samples per test case (Triton's CPU interpreter is slow: it gets fewer)
    unavailable: str | None = None  # why it cannot run here (the tests skip with this)


def _dali_unavailable() -> str | None:
    err = dali_augment._DALI_IMPORT_ERROR
    return None if err is None else f"needs nvidia-dali ({err})"


ENGINE_LIST = [
    Engine("triton", augment_triton, DEVICE, exact=EXACT, half_mismatch=0.05, batch=6,
           unavailable=None if triton_available(DEVICE) else
           "needs triton on CUDA, or TRITON_INTERPRET=1 set before import on CPU"),
    Engine("cpu_fused", augment_eager, "cpu", exact=1e-5, half_mismatch=0.05),
    Engine("dali", run_dali, "cpu", exact=1e-4, half_mismatch=None, unavailable=_dali_unavailable()),
]
ENGINES = pytest.mark.parametrize("engine", [
    pytest.param(e, id=e.name, marks=pytest.mark.skipif(e.unavailable is not None, reason=e.unavailable or ""))
    for e in ENGINE_LIST])

CFG = AugConfig(erase_p=0.5, max_angle=30)  # default ranges but a wider turn, erasing half the time
INDEX = [3, 1, 4, 1, 5, 9, 2, 6]  # a repeat and an out-of-order gather from 10 images; engine.batch of them


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [48, 112])
@ENGINES
def test_matches_reference(engine, size, channels, dtype):
    images, index = random_images(device=engine.device), torch.tensor(INDEX[:engine.batch], device=engine.device)
    params, out = sample_params(len(index), CFG, torch.Generator().manual_seed(1)), output_spec(size, channels, dtype)
    assert params.erase.any() and not params.erase.all(), "seed should erase some, not all"
    got = engine.run(images, index, params, out)
    want = augment_reference(images, index, params, out)
    assert got.device == images.device
    assert_close(got, want, out)
    if dtype != torch.float32 and engine.half_mismatch is not None:
        assert (got != want).float().mean().item() <= engine.half_mismatch
    # Erased pixels (the spec's box) are exactly 0, the mean, in every channel and dtype...
    inside = box_mask(erase_box(params, size), size).to(got.device)
    assert torch.equal(inside.flatten(1).any(1).cpu(), params.erase)  # a box exactly where erasing
    assert (torch.where(inside[:, None], got.float(), 0.0) == 0).all()
    # ...and only those, in float32. A half dtype can round a value a hair from the mean to 0
    # in one engine and not the other, so there the mask alone is checked.
    if dtype == torch.float32:
        assert torch.equal(got == 0, want == 0)


@pytest.mark.parametrize("size,channels", [(48, 1), (48, 3), (112, 1)])
@ENGINES
def test_identity_is_the_bilinearly_resized_input(engine, size, channels):
    n, out = engine.batch, output_spec(size, channels)
    images = random_images(n, device=engine.device)
    got = unit_scale(engine.run(images, torch.arange(n, device=engine.device), identity_params(n), out), out)
    src = images[:, None].float() / 255
    want = src if size == 48 else F.interpolate(src, size=(size, size), mode="bilinear", align_corners=False)
    assert got.shape == (n, channels, size, size)
    assert (got - want).abs().max().item() <= engine.exact  # every channel is the gray image
