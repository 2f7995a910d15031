"""The fused Triton kernel: what only it has. Its comparison with the reference, and the identity,
run in tests/test_engines.py with the other engines.

Without a GPU the kernel runs in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any import): slow, so batches are small.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.reference import augment_reference
from kernels.spec import AugConfig, identity_params, sample_params
from kernels.triton_augment import augment_triton, triton_available
from test_engines import (COLOUR100, DEVICE, DTYPES, EXACT, GRAY48, NONSQUARE, SOURCES, assert_close,
                          output_spec as make_spec, random_images, unit_scale)

CFG = AugConfig(erase_p=0.5)  # default geometry/jitter ranges, and erasing half the time


def make_images(n=10, device=DEVICE):
    return random_images(n, device=device)


def sampled(n, seed=1):
    return sample_params(n, CFG, torch.Generator().manual_seed(seed))


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
    assert_close(got, augment_reference(images, index, params, spec), spec, tol, tol)
    assert (unit_scale(got, spec)[:, 0] - want).abs().max().item() <= tol + EXACT


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


@pytest.mark.parametrize("source,channels", [(GRAY48, 1), (GRAY48, 3), (NONSQUARE, 3)],
                         ids=["gray-c1", "gray-c3", "colour"])
def test_layout_shape_dtype(source, channels):
    images, index = source.images(device=DEVICE), torch.tensor([0, 2], device=DEVICE)
    got = augment_triton(images, index, sampled(2, seed=3), make_spec(40, channels, torch.float16))
    assert got.shape == (2, channels, 40, 40) and got.dtype == torch.float16
    assert got.device == images.device
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert got.stride() == (40 * 40 * channels, 1, 40 * channels, channels)


@pytest.mark.parametrize("source", [GRAY48, COLOUR100], ids=lambda s: s.name)
def test_gather_follows_index(source):
    images, spec = source.images(device=DEVICE), make_spec(48, 1 if source.channels is None else 3)
    index, params = torch.tensor([7, 0, 3, 3, 9], device=DEVICE), sampled(5, seed=2)
    forward = augment_triton(images, index, params, spec)
    backward = augment_triton(images, index.flip(0), params[torch.arange(4, -1, -1)], spec)
    assert torch.equal(backward, forward.flip(0))
    # Different images really do give different outputs (the index is not ignored).
    plain = augment_triton(images, index, identity_params(5), spec)
    assert torch.equal(plain[2], plain[3]) and not torch.equal(plain[0], plain[1])
    if source.channels is None:  # 48 px in, 48 out: the identity is the image itself
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
    with pytest.raises(ValueError, match="1 or 3 channels"):
        augment_triton(images[..., None].expand(-1, -1, -1, 2).contiguous(), index, params, spec)
    with pytest.raises(ValueError, match="--channels 1"):  # colour in, gray out: pack gray instead
        augment_triton(COLOUR100.images(4, device=DEVICE), index, params, spec)


def test_triton_available(monkeypatch):
    import kernels.triton_augment as module

    assert triton_available(DEVICE)  # conftest set TRITON_INTERPRET=1 on a CPU-only machine
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
    @pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
    def test_matches_reference(self, source, size, channels, dtype):
        if source.channels == 3 and channels == 1:
            pytest.skip("a colour source gives 3 channels")
        images = source.images(n=500, device="cuda")
        gen = torch.Generator().manual_seed(5)
        index = torch.randint(0, 500, (256,), generator=gen).cuda()
        params = sample_params(256, AugConfig(erase_p=0.5, saturation=0.3), torch.Generator().manual_seed(1))
        spec = make_spec(size, channels, dtype)  # params stay on the CPU
        got = augment_triton(images, index, params, spec)
        assert got.is_cuda
        assert_close(got, augment_reference(images, index, params, spec), spec)

    @pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
    def test_identity_at_112_is_bilinear_resize(self, source):
        images = source.images(n=64, device="cuda")
        spec = make_spec(112, 1 if source.channels is None else 3)
        got = augment_triton(images, torch.arange(64, device="cuda"), identity_params(64), spec)
        src = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
        want = F.interpolate(src.float() / 255, size=(112, 112), mode="bilinear", align_corners=False)
        assert (unit_scale(got, spec) - want).abs().max().item() <= 1e-5 * max(1.0, source.h / 48)
