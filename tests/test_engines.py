"""Every fast augmentation engine against the pure-torch reference (the spec), one harness.

An engine is a name, a function (images (N, H, W) or (N, H, W, C) uint8, index (B,), AugParams,
OutputSpec) -> (B, C, S, S), the device it runs on and a skip reason where it cannot run here.
The tests below run each engine on the same inputs, from three sources: FER2013-like 48x48
gray, RAF-DB-like 100x100 colour and a non-square 64x40 (H x W) colour one, with the
saturation jitter on. What only one engine has (the Triton kernel's input checks, DALI's
decoder and iterator, the compiled CPU engine's buffers) is tested in its own file, with the
helpers defined here; the spec's own checks (the draw order, the saturation formula) are in
tests/test_saturation.py.

Without a GPU the Triton kernel runs in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any import) and DALI on CPU (device_id=None): slow, so batches
are small.
"""
from __future__ import annotations

import functools
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

def random_images(n=10, h=48, w=48, seed=0, device="cpu", channels=None) -> torch.Tensor:
    """(n, h, w) uint8 noise, or (n, h, w, channels) when channels is given (3: RGB)."""
    # Random noise is the hardest case for interpolation: neighbours differ by up to 255.
    g = torch.Generator().manual_seed(seed)
    shape = (n, h, w) if channels is None else (n, h, w, channels)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)


@dataclass(frozen=True)
class Source:
    """A data set's image shape: (h, w) and channels (None: the (N, H, W) gray layout)."""

    name: str
    h: int
    w: int
    channels: int | None = None

    def images(self, n=10, seed=0, device="cpu") -> torch.Tensor:
        return random_images(n, self.h, self.w, seed, device, self.channels)

    @property
    def colour(self) -> bool:
        return self.channels == 3


GRAY48 = Source("gray48", 48, 48)
COLOUR100 = Source("colour100", 100, 100, 3)
NONSQUARE = Source("colour64x40", 64, 40, 3)  # taller than wide: H != W catches a swapped axis
SOURCES = [GRAY48, COLOUR100, NONSQUARE]


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
    in_channels = 1 if images.dim() == 3 else images.shape[3]
    loader = dali_augment.dali_iterator(dali_batches(picked, labels, params), out, DALI_BATCH,
                                        device_id=device_id, in_channels=in_channels)
    return torch.cat([x for x, _ in loader]).contiguous(memory_format=torch.channels_last)


def resized(src: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size): the bilinear resize the identity view is."""
    if src.shape[-2:] == (size, size):
        return src
    return F.interpolate(src, size=(size, size), mode="bilinear", align_corners=False)


def as_planes(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W) float on [0, 1]."""
    x = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return x.float() / 255


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
    # The spec itself: trivially equal to itself in test_matches_reference, but held to independent
    # formulas by the identity and saturation tests (and raises the colour -> gray error as all do).
    Engine("reference", augment_reference, "cpu", exact=1e-5, half_mismatch=0.0),
    # On CPU one program per sample (block 16384 >= 112 x 112): the interpreter's cost is per program,
    # and the maths per pixel is the same; tests/test_kernels.py runs the default block (many programs).
    Engine("triton", augment_triton if DEVICE == "cuda" else functools.partial(augment_triton, block=16384),
           DEVICE, exact=EXACT, half_mismatch=0.05, batch=6,
           unavailable=None if triton_available(DEVICE) else
           "needs triton on CUDA, or TRITON_INTERPRET=1 set before import on CPU"),
    Engine("cpu_fused", augment_eager, "cpu", exact=1e-5, half_mismatch=0.05),
    Engine("dali", run_dali, "cpu", exact=1e-4, half_mismatch=None, unavailable=_dali_unavailable()),
]
ENGINES = pytest.mark.parametrize("engine", [
    pytest.param(e, id=e.name, marks=pytest.mark.skipif(e.unavailable is not None, reason=e.unavailable or ""))
    for e in ENGINE_LIST])

# Default ranges but a wider turn, erasing half the time and a wide saturation jitter (drawn last,
# so the other draws are those of the config without it).
CFG = AugConfig(erase_p=0.5, max_angle=30, saturation=0.5)
INDEX = [3, 1, 4, 1, 5, 9, 2, 6]  # a repeat and an out-of-order gather from 10 images; engine.batch of them


# ----------------------------------------------------------------------------- the tests

# (source, output channels): gray gives 1 or 3 (replicated), colour gives 3.
CASES = [pytest.param(GRAY48, 1, id="gray48-c1"), pytest.param(GRAY48, 3, id="gray48-c3"),
         pytest.param(COLOUR100, 3, id="colour100"), pytest.param(NONSQUARE, 3, id="colour64x40")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [48, 112])
@pytest.mark.parametrize("source,channels", CASES)
@ENGINES
def test_matches_reference(engine, source, channels, size, dtype):
    images = source.images(device=engine.device)
    index = torch.tensor(INDEX[:engine.batch], device=engine.device)
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


@pytest.mark.parametrize("source,channels,size", [
    (GRAY48, 1, 48), (GRAY48, 3, 48), (GRAY48, 1, 112), (COLOUR100, 3, 48), (COLOUR100, 3, 100),
    (NONSQUARE, 3, 48), (Source("gray40x64", 40, 64), 1, 32)], ids=lambda v: getattr(v, "name", str(v)))
@ENGINES
def test_identity_is_the_bilinearly_resized_input(engine, source, channels, size):
    n, out = engine.batch, output_spec(size, channels)
    images = source.images(n, device=engine.device)
    got = unit_scale(engine.run(images, torch.arange(n, device=engine.device), identity_params(n), out), out)
    want = resized(as_planes(images), size).expand(n, channels, size, size)  # gray: every channel
    assert got.shape == (n, channels, size, size)
    # Source coordinates carry float32 rounding in proportion to the source side (engine.exact is
    # for 48 px): a 100 px side allows about twice as much.
    assert (got - want).abs().max().item() <= engine.exact * max(1.0, max(source.h, source.w) / 48)


@ENGINES
def test_saturation_without_geometry(engine):
    """Identity geometry, so no interpolation error: the saturation jitter alone, against the formula
    written out per pixel (s = 0 is the luma in every channel, s > 1 reaches the clamp)."""
    n, out = min(engine.batch, 6), output_spec(48, 3)
    images = COLOUR100.images(n, device=engine.device)[:, 26:74, 26:74].contiguous()  # 48 x 48: no resize
    params = identity_params(n)
    params.saturation[:] = torch.tensor([0.0, 0.5, 1.0, 1.3, 1.6, 1.99])[:n]
    params.brightness[:] = torch.tensor([1.0, 1.2, 0.9, 1.0, 1.1, 0.8])[:n]  # saturation follows the jitter's clamp
    got = unit_scale(engine.run(images, torch.arange(n, device=engine.device), params, out), out).cpu()
    v = (params.brightness.view(n, 1, 1, 1) * images.permute(0, 3, 1, 2).float().cpu() / 255).clamp(0, 1)
    luma = 0.299 * v[:, 0:1] + 0.587 * v[:, 1:2] + 0.114 * v[:, 2:3]
    want = (luma + params.saturation.view(n, 1, 1, 1) * (v - luma)).clamp(0, 1)
    assert (got - want).abs().max().item() <= max(engine.exact, 1e-5)
    assert (got[0] - got[0, :1]).abs().max().item() <= max(engine.exact, 1e-5)  # s = 0: gray


@ENGINES
def test_colour_source_cannot_give_gray(engine):
    images = COLOUR100.images(4, device=engine.device)
    with pytest.raises(ValueError, match="--channels 1"):
        engine.run(images, torch.arange(4, device=engine.device), identity_params(4), output_spec(48, 1))


def test_reference_saturation_leaves_gray_alone():
    """Saturation acts on colour only: on a gray source (either layout) any factor is the identity,
    and a colour source of three equal channels stays gray."""
    images = GRAY48.images(4)
    index, out = torch.arange(4), output_spec(48, 3)
    params = sample_params(4, CFG, torch.Generator().manual_seed(2))
    plain = sample_params(4, AugConfig(erase_p=0.5, max_angle=30), torch.Generator().manual_seed(2))
    assert not torch.equal(params.saturation, plain.saturation)
    want = augment_reference(images, index, plain, out)
    assert torch.equal(augment_reference(images, index, params, out), want)
    assert torch.equal(augment_reference(images[..., None], index, params, out), want)
    assert torch.equal(augment_reference(images[..., None].expand(-1, -1, -1, 3).contiguous(), index, params, out),
                       want)


def test_reference_non_square_geometry():
    """H != W: normalised coordinates per axis. A flip mirrors the columns, a shift of one image side
    moves W columns across (not H), and a turn of 180 degrees is a flip of both axes."""
    images, out = random_images(4, 12, 20), output_spec(12, 1)
    src = images[:, None].float() / 255
    params = identity_params(4)
    params.flip[1] = True
    params.angle[2] = 180.0
    params.tx[3] = 2.0 * 5 / 20  # 5 columns to the right
    got = unit_scale(augment_reference(images, torch.arange(4), params, out), out)
    want = resized(src, 12)
    assert (got[1] - want[1].flip(-1)).abs().max() < 1e-5
    assert (got[2] - want[2].flip(-1, -2)).abs().max() < 1e-5
    # Shifted right by 5 of 20 source columns = 3 of 12 output columns; border replicated on the left.
    shifted = resized(torch.cat([src[3, :, :, :1].expand(-1, -1, 5), src[3, :, :, :15]], -1)[None], 12)[0]
    assert (got[3] - shifted).abs().max() < 1e-5
