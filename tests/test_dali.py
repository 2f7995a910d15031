"""The DALI engine: what only it has (exact flips and jitter, the erase op, partial batches, its
iterator), on CPU (device_id=None). Its comparison with the reference and the identity run in
tests/test_engines.py with the other engines.

GPU variants run only where CUDA is present.
"""
import pytest
import torch

pytest.importorskip("nvidia.dali")

from kernels.reference import augment_reference  # noqa: E402
from kernels.spec import AugConfig, erase_box, identity_params, sample_params  # noqa: E402
from pipeline import dali_augment  # noqa: E402
from pipeline.dali_augment import dali_iterator  # noqa: E402
from test_engines import DALI_BATCH as B, assert_close, dali_batches, output_spec, run_dali, unit_scale  # noqa: E402

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
def test_gpu_iterator_matches_reference():
    images, labels, params = data(2 * B + 5, seed=13)
    out = output_spec(112, 3, torch.float16)
    loader = dali_iterator(dali_batches(images, labels, params), out, B, device_id=0)
    check_iterator(loader, images, labels, params, out, device="cuda")
