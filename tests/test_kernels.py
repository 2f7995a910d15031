"""The fused Triton augmentation kernel against the pure-torch reference (the spec).

Without a GPU the kernel runs in Triton's CPU interpreter: slow, so batches are small.
"""
import os

import pytest
import torch
import torch.nn.functional as F

# Triton picks the interpreter when @triton.jit decorates the kernel, i.e. when
# kernels.triton_augment is imported, so the variable must be set before that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.reference import augment_reference  # noqa: E402
from kernels.spec import (AugConfig, OutputSpec, erase_box, identity_params,  # noqa: E402
                          sample_params)
from kernels.triton_augment import augment_triton, triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_ERR, MEAN_ERR = 2 / 255, 0.5 / 255  # on the [0, 1] scale, before normalising
# "Exact" in float32: source coordinates near pixel 47 carry ~4e-6 of rounding, and
# undoing the normalisation adds a little more; 1e-5 is 0.003/255.
EXACT = 1e-5
CFG = AugConfig(erase_p=0.5)  # default geometry/jitter ranges, and erasing half the time


def make_images(n=10, h=48, w=48, seed=0, device=DEVICE):
    # Random noise is the hardest case for interpolation: neighbours differ by up to 255.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w), dtype=torch.uint8, generator=g).to(device)


def make_spec(size, channels, dtype=torch.float32):
    if channels == 3:  # distinct per-channel stats, so a channel mix-up shows
        return OutputSpec(size=size, channels=3, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), dtype=dtype)
    return OutputSpec(size=size, channels=1, mean=(0.5,), std=(0.25,), dtype=dtype)


def unit_scale(x, spec):
    """Undo the normalisation: back to [0, 1] intensities in float32."""
    mean, std = spec.channel_stats()
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.float() * std + mean


def check_close(got, want, spec, max_err=MAX_ERR, mean_err=MEAN_ERR):
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (unit_scale(got, spec) - unit_scale(want, spec)).abs()
    assert err.max().item() <= max_err, f"max abs err {err.max().item() * 255:.4f}/255"
    assert err.mean().item() <= mean_err, f"mean abs err {err.mean().item() * 255:.4f}/255"
    return err


def sampled(n, seed=1):
    return sample_params(n, CFG, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [48, 112])
def test_matches_reference(size, channels, dtype):
    images, index = make_images(), torch.tensor([3, 1, 4, 1, 5, 9], device=DEVICE)
    params, spec = sampled(6), make_spec(size, channels, dtype)
    assert params.erase.any() and not params.erase.all(), "seed should erase some, not all"
    got = augment_triton(images, index, params, spec)
    want = augment_reference(images, index, params, spec)
    check_close(got, want, spec)
    if dtype != torch.float32:
        # Both round float32 to nearest even, so only values whose float32 inputs differ
        # by a hair across a rounding boundary disagree (~1%); truncation would be ~50%.
        assert (got != want).float().mean().item() <= 0.05
    # Erased pixels are exactly 0 (the mean) in every channel, and only those.
    box = erase_box(params, size)
    ys, xs = torch.arange(size)[:, None], torch.arange(size)[None, :]
    for i, (x0, y0, x1, y1) in enumerate(box.tolist()):
        inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        sample = got[i].float().cpu()
        assert (sample[:, inside] == 0).all()
        assert inside.any() == bool(params.erase[i])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flip_is_exact(dtype):
    images, index = make_images(), torch.arange(6, device=DEVICE)
    params, spec = identity_params(6), make_spec(48, 1, dtype)
    params.flip[::2] = True
    got = augment_triton(images, index, params, spec)
    want = images[:6].float() / 255
    want[::2] = want[::2].flip(-1)
    # Half dtypes: float32 noise may tip a value to the neighbouring representable one,
    # one ulp at |normalised| < 4 (2 eps), i.e. 2 eps * std on the [0, 1] scale.
    tol = EXACT if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * spec.std[0]
    check_close(got, augment_reference(images, index, params, spec), spec, tol, tol)
    assert (unit_scale(got, spec)[:, 0] - want).abs().max().item() <= tol + EXACT


def test_identity_at_native_size_returns_input():
    images, index = make_images(), torch.arange(10, device=DEVICE)
    spec = make_spec(48, 3)
    got = unit_scale(augment_triton(images, index, identity_params(10), spec), spec)
    want = (images.float() / 255)[:, None].expand(-1, 3, -1, -1)
    assert (got - want).abs().max().item() <= EXACT


def test_identity_at_112_is_bilinear_resize():
    images, index = make_images(), torch.arange(6, device=DEVICE)
    spec = make_spec(112, 1)
    got = unit_scale(augment_triton(images, index, identity_params(6), spec), spec)
    want = F.interpolate(images[:6, None].float() / 255, size=(112, 112), mode="bilinear",
                         align_corners=False)
    assert (got - want).abs().max().item() <= 1e-5


def test_jitter_formula_without_reference():
    # An independent check of the pointwise part: contrast about mid-grey, gain, clamp.
    images, index = make_images(), torch.arange(4, device=DEVICE)
    params = identity_params(4)
    params.brightness[:] = torch.tensor([1.0, 1.2, 0.8, 1.15])
    params.contrast[:] = torch.tensor([1.0, 0.8, 1.2, 1.3])
    spec = make_spec(48, 1)
    got = unit_scale(augment_triton(images, index, params, spec), spec)[:, 0]
    x = images[:4].float() / 255
    b, c = (t.view(4, 1, 1).to(DEVICE) for t in (params.brightness, params.contrast))
    want = (b * (0.5 + c * (x - 0.5))).clamp(0, 1)
    assert (got - want).abs().max().item() <= EXACT


@pytest.mark.parametrize("channels", [1, 3])
def test_layout_shape_dtype(channels):
    images, index = make_images(), torch.tensor([0, 2], device=DEVICE)
    got = augment_triton(images, index, sampled(2, seed=3), make_spec(40, channels, torch.float16))
    assert got.shape == (2, channels, 40, 40) and got.dtype == torch.float16
    assert got.device == images.device
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert got.stride() == (40 * 40 * channels, 1, 40 * channels, channels)


def test_gather_follows_index():
    images, spec = make_images(), make_spec(48, 1)
    index, params = torch.tensor([7, 0, 3, 3, 9], device=DEVICE), sampled(5, seed=2)
    forward = augment_triton(images, index, params, spec)
    backward = augment_triton(images, index.flip(0), params[torch.arange(4, -1, -1)], spec)
    assert torch.equal(backward, forward.flip(0))
    # Different images really do give different outputs (the index is not ignored).
    plain = augment_triton(images, index, identity_params(5), spec)
    assert torch.equal(plain[2], plain[3]) and not torch.equal(plain[0], plain[1])
    assert torch.allclose(unit_scale(plain, spec)[:, 0], images[index].float() / 255, atol=EXACT)


def test_rejects_bad_input():
    images, index, spec = make_images(), torch.arange(4, device=DEVICE), make_spec(48, 1)
    params = identity_params(4)
    with pytest.raises(AssertionError, match="uint8"):
        augment_triton(images.float(), index, params, spec)
    with pytest.raises(AssertionError, match="uint8"):
        augment_triton(images[0], index, params, spec)
    with pytest.raises(AssertionError, match="one parameter set per index"):
        augment_triton(images, index, identity_params(3), spec)
    with pytest.raises(AssertionError, match="contiguous"):
        augment_triton(images.transpose(1, 2), index, params, spec)
    with pytest.raises(AssertionError, match="index must be"):
        augment_triton(images, index.float(), params, spec)
    with pytest.raises(AssertionError, match="index must be"):
        augment_triton(images, index[:, None], params, spec)


def test_triton_available(monkeypatch):
    import kernels.triton_augment as module

    assert triton_available(DEVICE)  # this module set TRITON_INTERPRET=1 on a CPU-only machine
    assert not triton_available("meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_available("cpu") is False  # without the interpreter Triton cannot run on CPU
    assert triton_available("cuda") is torch.cuda.is_available()
    monkeypatch.setattr(module, "triton", None)  # triton not installed: nothing can run it
    assert not triton_available(DEVICE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCompiledOnGPU:
    """The compiled kernel (not the interpreter) at training sizes vs the reference on CUDA."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("channels", [1, 3])
    @pytest.mark.parametrize("size", [48, 112, 224])
    def test_matches_reference(self, size, channels, dtype):
        images = make_images(n=500, device="cuda")
        gen = torch.Generator().manual_seed(5)
        index = torch.randint(0, 500, (256,), generator=gen).cuda()
        params, spec = sampled(256), make_spec(size, channels, dtype)  # params stay on the CPU
        got = augment_triton(images, index, params, spec)
        assert got.is_cuda and got.is_contiguous(memory_format=torch.channels_last)
        check_close(got, augment_reference(images, index, params, spec), spec)

    def test_identity_at_112_is_bilinear_resize(self):
        images = make_images(n=64, device="cuda")
        spec = make_spec(112, 1)
        got = augment_triton(images, torch.arange(64, device="cuda"), identity_params(64), spec)
        want = F.interpolate(images[:, None].float() / 255, size=(112, 112), mode="bilinear",
                             align_corners=False)
        assert (unit_scale(got, spec) - want).abs().max().item() <= 1e-5
