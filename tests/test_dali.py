"""The DALI engine: what only it has (exact flips and jitter, the erase op, partial batches, its
iterator, decoding file bytes), on CPU (device_id=None). Its comparison with the reference and the
identity on raw pixels run in tests/test_engines.py with the other engines.

GPU variants run only where CUDA is present.
"""
import io

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from kernels.reference import augment_reference  # noqa: E402
from kernels.spec import AugConfig, erase_box, identity_params, sample_params  # noqa: E402
from pipeline import dali_augment  # noqa: E402
from pipeline.dali_augment import dali_iterator  # noqa: E402
from test_engines import (COLOUR100, DALI_BATCH as B, GRAY48, NONSQUARE, Source, assert_close,  # noqa: E402
                          dali_batches, output_spec, run_dali, unit_scale)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 48, 48), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 7, (n,), generator=g)
    params = sample_params(n, AugConfig(erase_p=0.5), g)
    return images, labels, params


def augment_with_dali(images, params, out, device_id=None) -> torch.Tensor:
    return run_dali(images, torch.arange(len(images)), params, out, device_id=device_id)


def test_flip_is_exact():
    images, _, _ = data(4)
    params = identity_params(4)
    params.flip[:] = torch.tensor([True, False, True, False])
    out = output_spec(48, 1)
    got = unit_scale(augment_with_dali(images, params, out), out)
    src = images.unsqueeze(1).float() / 255
    want = torch.where(params.flip.view(-1, 1, 1, 1), src.flip(-1), src)
    assert (got - want).abs().max().item() < 1e-4


def test_jitter_is_exact():
    """No geometry, so no interpolation error: catches small intensity offsets
    (for example a contrast centre of 128 instead of 127.5) that the 2/255 bound allows."""
    images, _, _ = data(B)
    params = identity_params(B)
    g = torch.Generator().manual_seed(4)
    params.brightness[:] = 0.6 + 0.8 * torch.rand(B, generator=g)  # wide, to reach the clamp
    params.contrast[:] = 0.6 + 0.8 * torch.rand(B, generator=g)
    out = output_spec(48, 1)
    got = augment_with_dali(images, params, out)
    want = augment_reference(images, torch.arange(B), params, out)
    assert (unit_scale(got, out) - unit_scale(want, out)).abs().max().item() < 0.01 / 255


def test_erase_box_is_zero_exactly():
    images, _, _ = data(4)
    params = sample_params(4, AugConfig(erase_p=1.0), torch.Generator().manual_seed(3))
    out = output_spec(112, 3)
    got = augment_with_dali(images, params, out)
    box = erase_box(params, out.size)
    for i, (x0, y0, x1, y1) in enumerate(box.tolist()):
        assert x1 > x0 and y1 > y0
        assert (got[i, :, y0:y1, x0:x1] == 0).all()
        outside = got[i].clone()
        outside[:, y0:y1, x0:x1] = 1.0
        assert (outside != 0).float().mean() > 0.95  # elsewhere the image, not erased


def test_partial_batch_and_outputs_stay_valid():
    images, labels, params = data(B + 3, seed=7)
    out = output_spec(112, 3, torch.float16)
    # full batch, 3 samples through the pipeline built for 8, then a full batch again
    source = [(images[:B], labels[:B], params[:B]), (images[B:], labels[B:], params[B:]),
              (images[:B], labels[:B], params[:B])]
    full, last, again = [x for x, _ in dali_iterator(source, out, B)]
    assert last.shape == (3, 3, 112, 112)
    want = augment_reference(images, torch.arange(B + 3), params, out)
    assert_close(full, want[:B], out)  # still intact after later runs
    assert_close(last, want[B:], out)
    assert torch.equal(full, again)


def check_iterator(loader, images, labels, params, out, device="cpu"):
    """Two epochs over the loader; every batch compared after the epoch (no buffer reuse)."""
    want = augment_reference(images.to(device), torch.arange(len(images), device=device),
                             params, out)
    for _ in range(2):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [B, B, len(images) - 2 * B]
        got = torch.cat([x for x, _ in batches])
        assert torch.equal(torch.cat([y for _, y in batches]).cpu(), labels)
        for x, y in batches:
            assert x.device.type == device and y.device.type == device and y.dtype == torch.int64
        assert_close(batches[0][0], want[:B], out)
        assert_close(got.contiguous(memory_format=torch.channels_last), want, out)


def test_iterator_matches_reference():
    images, labels, params = data(2 * B + 5, seed=11)
    out = output_spec(112, 3, torch.bfloat16)
    loader = dali_iterator(dali_batches(images, labels, params), out, B)
    check_iterator(loader, images, labels, params, out)


def test_iterator_takes_a_callable_source():
    images, labels, params = data(2 * B + 1, seed=12)
    out = output_spec(48, 1)
    loader = dali_iterator(lambda: iter(dali_batches(images, labels, params)), out, B)
    check_iterator(loader, images, labels, params, out)


# ----------------------------------------------------------------------------- colour, sizes, decoding

SAT_CFG = AugConfig(erase_p=0.5, max_angle=30, saturation=0.5)


def encode(images: torch.Tensor, fmt: str = "PNG", **options) -> list[np.ndarray]:
    """Each (H, W) or (H, W, 3) uint8 image as its file bytes (1-D uint8), as an encoded shard holds them."""
    from PIL import Image

    blobs = []
    for img in images.numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **options)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    return blobs


def run_encoded(blobs, params, out, in_channels, device_id=None, precomputed_hw=None) -> torch.Tensor:
    """File bytes through dali_iterator(encoded=True); params as AugParams, or (with the files' (h, w))
    as dali_param_arrays rows, which is what the loaders pass."""
    labels = torch.arange(len(blobs))
    if precomputed_hw is not None:
        arrays = dali_augment.dali_param_arrays(params, precomputed_hw, out)
        params = [{k: v[i:i + B] for k, v in arrays.items()} for i in range(0, len(blobs), B)]
    else:
        params = [params[i:i + B] for i in range(0, len(blobs), B)]
    source = [(blobs[i:i + B], labels[i:i + B], params[k]) for k, i in enumerate(range(0, len(blobs), B))]
    batches = list(dali_iterator(source, out, B, device_id=device_id, encoded=True, in_channels=in_channels))
    assert torch.equal(torch.cat([y for _, y in batches]).cpu(), labels)
    return torch.cat([x for x, _ in batches]).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("source,size", [(GRAY48, 48), (COLOUR100, 112), (NONSQUARE, 48)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_decoded_png_matches_reference(source, size):
    """PNG is lossless: DALI's decode + augment of the file bytes is the reference on the pixels."""
    images = source.images(B + 3, seed=21)
    params = sample_params(B + 3, SAT_CFG, torch.Generator().manual_seed(22))
    out = output_spec(size, 3)
    in_channels = 3 if source.colour else 1
    got = run_encoded(encode(images), params, out, in_channels)
    want = augment_reference(images, torch.arange(B + 3), params, out)
    assert_close(got, want, out)
    # The loaders' way: matrices precomputed for the epoch from the shard's per-file shapes.
    shapes = np.array([[source.h, source.w, in_channels]] * (B + 3))
    assert torch.equal(run_encoded(encode(images), params, out, in_channels, precomputed_hw=shapes), got)


def test_decoded_files_of_different_sizes_in_one_batch():
    """Every sample gets a matrix for its own (h, w): each output equals the reference on that image."""
    sources = [COLOUR100, NONSQUARE, Source("c48", 48, 48, 3), Source("c30x70", 30, 70, 3)]
    images = [src.images(1, seed=30 + k)[0] for k, src in enumerate(sources)]
    blobs = [b for img in images for b in encode(img[None])]
    params = sample_params(len(blobs), SAT_CFG, torch.Generator().manual_seed(31))
    out = output_spec(56, 3)
    got = run_encoded(blobs, params, out, 3)
    for i, img in enumerate(images):
        assert_close(got[i:i + 1], augment_reference(img[None], torch.tensor([0]), params[i:i + 1], out), out)
    hw = np.array([[img.shape[0], img.shape[1]] for img in images])
    assert torch.equal(run_encoded(blobs, params, out, 3, precomputed_hw=hw), got)


# Measured on DALI 2.4 CPU (libjpeg-turbo via nvImageCodec) against Pillow: the decoded pixels of these
# JPEGs are identical (0 of 255 max), so the bound is the warp's own; nvJPEG on a GPU may differ by a
# few levels, which the GPU test's wider bound allows.
@pytest.mark.parametrize("source,in_channels", [(GRAY48, 1), (COLOUR100, 3), (NONSQUARE, 3)],
                         ids=["gray48", "colour100", "colour64x40"])
def test_decoded_jpeg_matches_reference_on_pillow_pixels(source, in_channels):
    from pipeline.decode import decode_image

    images = source.images(B, seed=41)
    blobs = encode(images, "JPEG", quality=90)
    pixels = torch.from_numpy(np.stack([decode_image(b, in_channels) for b in blobs]))
    params = sample_params(B, SAT_CFG, torch.Generator().manual_seed(42))
    out = output_spec(64, 3)
    got = run_encoded(blobs, params, out, in_channels)
    assert_close(got, augment_reference(pixels, torch.arange(B), params, out), out)


def test_raw_colour_iterator_and_channel_checks():
    images = COLOUR100.images(B + 2, seed=51)
    labels = torch.arange(B + 2)
    params = sample_params(B + 2, SAT_CFG, torch.Generator().manual_seed(52))
    out = output_spec(48, 3, torch.float16)
    loader = dali_iterator(dali_batches(images, labels, params), out, B, in_channels=3)
    got = torch.cat([x for x, _ in loader])
    assert_close(got.contiguous(memory_format=torch.channels_last),
                 augment_reference(images, torch.arange(B + 2), params, out), out)
    with pytest.raises(ValueError, match="--channels 1"):
        dali_iterator([], output_spec(48, 1), B, in_channels=3)
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        dali_iterator([], out, B, in_channels=2)
    with pytest.raises(ValueError, match="built for in_channels=1"):  # colour pixels, gray pipeline
        dali_augment.dali_inputs(images[:2], params[:2], out, in_channels=1)
    with pytest.raises(ValueError, match="C 1 or 3"):
        dali_augment.dali_inputs(images[:2, ..., :2], params[:2], out)


def test_param_arrays_take_per_sample_sizes():
    params = sample_params(5, SAT_CFG, torch.Generator().manual_seed(61))
    out = output_spec(32, 3)
    hw = np.array([[48, 48], [64, 40], [100, 100], [30, 70], [48, 48]])
    per_sample = dali_augment.dali_param_arrays(params, hw, out)["matrix"]
    for i, (h, w) in enumerate(hw):
        one = dali_augment.dali_param_arrays(params[i:i + 1], (int(h), int(w)), out)["matrix"]
        assert np.array_equal(per_sample[i:i + 1], one)
    # (H, W, C) and (B, 3) shapes: the channel entry is ignored.
    assert np.array_equal(dali_augment.dali_param_arrays(params, (64, 40, 3), out)["matrix"],
                          dali_augment.dali_param_arrays(params, (64, 40), out)["matrix"])
    shapes = np.concatenate([hw, np.full((5, 1), 3)], 1)
    assert np.array_equal(dali_augment.dali_param_arrays(params, shapes, out)["matrix"], per_sample)
    with pytest.raises(ValueError, match="in_hw"):
        dali_augment.dali_param_arrays(params, hw[:3], out)
    # The saturation matrices are the spec's blend with the luma, one per sample.
    m = dali_augment.dali_param_arrays(params, hw, out)["saturation"]
    rgb = np.random.default_rng(0).random((5, 3))
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    want = luma[:, None] + params.saturation.numpy()[:, None] * (rgb - luma[:, None])
    assert np.abs(np.einsum("bij,bj->bi", m, rgb) - want).max() < 1e-6


def test_clear_error_without_dali(monkeypatch):
    monkeypatch.setattr(dali_augment, "_DALI_IMPORT_ERROR", ImportError("no module"))
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda130"):
        dali_iterator([], output_spec(48, 1), B)


@cuda
@pytest.mark.parametrize("channels,dtype", [(1, torch.float32), (3, torch.float16),
                                            (3, torch.bfloat16)])
def test_gpu_matches_reference(channels, dtype):
    images, _, params = data(B + 3, seed=5)
    out = output_spec(112, channels, dtype)
    got = augment_with_dali(images, params, out, device_id=0)
    assert got.is_cuda
    want = augment_reference(images.cuda(), torch.arange(B + 3, device="cuda"), params, out)
    assert_close(got, want, out)


@cuda
@pytest.mark.parametrize("source", [GRAY48, COLOUR100, NONSQUARE], ids=lambda s: s.name)
def test_gpu_decodes_and_matches_reference(source):
    """device="mixed": nvJPEG (and nvImageCodec for PNG) on the GPU. PNG stays exact; JPEG is
    compared with Pillow's pixels within a few levels of decoder difference."""
    from pipeline.decode import decode_image

    in_channels = 3 if source.colour else 1
    images = source.images(B + 3, seed=71)
    params = sample_params(B + 3, SAT_CFG, torch.Generator().manual_seed(72))
    out = output_spec(112, 3, torch.float16)
    got = run_encoded(encode(images), params, out, in_channels, device_id=0)
    assert got.is_cuda
    want = augment_reference(images.cuda(), torch.arange(B + 3, device="cuda"), params, out)
    assert_close(got, want, out)
    blobs = encode(images, "JPEG", quality=90)
    pixels = torch.from_numpy(np.stack([decode_image(b, in_channels) for b in blobs])).cuda()
    got = run_encoded(blobs, params, out, in_channels, device_id=0)
    assert_close(got, augment_reference(pixels, torch.arange(B + 3, device="cuda"), params, out), out,
                 max_err=8 / 255, mean_err=1 / 255)


@cuda
def test_gpu_iterator_matches_reference():
    images, labels, params = data(2 * B + 5, seed=13)
    out = output_spec(112, 3, torch.float16)
    loader = dali_iterator(dali_batches(images, labels, params), out, B, device_id=0)
    check_iterator(loader, images, labels, params, out, device="cuda")
