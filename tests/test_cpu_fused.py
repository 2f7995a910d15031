"""The CPU engine (explicit-gather form of the spec, compiled in the loader) vs the reference."""
from __future__ import annotations

import pytest
import torch

from kernels.cpu_fused import augment_explicit, compiled_explicit
from kernels.reference import augment_reference
from kernels.spec import AugConfig, OutputSpec, erase_box, identity_params, sample_params


def unnormalise(x: torch.Tensor, out: OutputSpec) -> torch.Tensor:
    mean, std = out.channel_stats()
    return x.float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


@pytest.mark.parametrize("size", [48, 112])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_explicit_matches_reference(size, channels, dtype):
    g = torch.Generator().manual_seed(size + channels)
    images = torch.randint(0, 256, (12, 48, 48), dtype=torch.uint8, generator=g)
    index = torch.randperm(12, generator=g)[:8]
    params = sample_params(8, AugConfig(erase_p=0.5, max_angle=30), g)
    mean, std = ((0.5,), (0.25,)) if channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = OutputSpec(size=size, channels=channels, mean=mean, std=std, dtype=dtype)
    ref = augment_reference(images, index, params, out)
    got = augment_explicit(images, index, params, out)
    assert got.shape == ref.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    err = (unnormalise(got, out) - unnormalise(ref, out)).abs()
    assert err.max() <= 2 / 255 and err.mean() <= 0.5 / 255
    # Erased pixels (the spec's box) are exactly 0, the mean, in every channel and dtype.
    inside = box_mask(erase_box(params, size), size)
    assert params.erase.any() and inside.any()
    assert (got.float() * inside[:, None] == 0).all()
    # And only those, in float32. A half dtype can round a value a hair from the mean to 0
    # in one engine and not the other, so there the mask alone is checked.
    assert torch.equal(got == 0, ref == 0) or dtype != torch.float32


def box_mask(box: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) boxes [x0, y0, x1, y1) -> (B, size, size) bool, True inside."""
    x0, y0, x1, y1 = (box[:, k].view(-1, 1, 1) for k in range(4))
    xs, ys = torch.arange(size).view(1, 1, -1), torch.arange(size).view(1, -1, 1)
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def test_explicit_identity_and_flip_are_exact():
    images = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    out = OutputSpec()
    params = identity_params(4)
    params.flip[1::2] = True
    got = unnormalise(augment_explicit(images, torch.arange(4), params, out), out)[:, 0] * 255
    expected = images.float().clone()
    expected[1::2] = expected[1::2].flip(-1)
    assert (got - expected).abs().max() < 1e-3


def test_compiled_matches_eager():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 48, 48), dtype=torch.uint8, generator=g)
    params = sample_params(6, AugConfig(erase_p=0.5), g)
    out = OutputSpec(size=64, channels=3)
    eager = augment_explicit(images, torch.arange(6), params, out)
    compiled = compiled_explicit()(images, torch.arange(6), params, out)
    assert (eager - compiled).abs().max() < 1e-4


def test_compiled_engine_never_overwrites_a_batch_still_held():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 48, 48), dtype=torch.uint8, generator=g)
    out = OutputSpec(size=32, channels=3)
    engine = compiled_explicit()
    draws = [sample_params(4, AugConfig(), g) for _ in range(4)]
    index = torch.arange(4)
    held = [engine(images, index, p, out) for p in draws]  # every batch kept alive
    for p, batch in zip(draws, held):
        assert torch.allclose(batch, augment_explicit(images, index, p, out), atol=1e-4)


def test_buffer_pool_reuses_only_released_buffers():
    from kernels.buffers import BufferPool

    pool = BufferPool(max_buffers=2)
    assert pool.reuse, "torch's storage use count failed the check: every batch is a fresh allocation"
    a = pool.get((4, 5), torch.float32, "cpu")
    a_ptr, view = a.data_ptr(), a[1:]
    del a
    b = pool.get((4, 5), torch.float32, "cpu")
    assert b.data_ptr() != a_ptr  # the view keeps a's memory busy
    del view
    c = pool.get((4, 5), torch.float32, "cpu")
    assert c.data_ptr() == a_ptr  # released: handed out again
    d = pool.get((4, 5), torch.float32, "cpu")  # both pooled buffers busy, pool full
    assert d.data_ptr() not in (b.data_ptr(), c.data_ptr())
    assert pool.get((2, 5), torch.float32, "cpu").shape == (2, 5)


def test_buffer_pool_without_use_count_allocates_plainly(monkeypatch):
    from kernels import buffers

    monkeypatch.setattr(buffers, "_USE_COUNT", None)  # a torch without the private reference count
    pool = buffers.BufferPool()
    held = [pool.get((4, 5), torch.float32, "cpu") for _ in range(3)]
    assert not pool.reuse and len({t.data_ptr() for t in held}) == 3
    assert all(t.shape == (4, 5) and t.dtype == torch.float32 for t in held)
    assert not any(pool._buffers.values())  # nothing kept: memory goes back when the caller lets go


def test_unknown_inductor_options_are_dropped(monkeypatch):
    """A torch without an option we tune compiles with its defaults instead of failing."""
    from kernels import cpu_fused

    monkeypatch.setattr(cpu_fused, "_INDUCTOR_OPTIONS", {"realize_cpu_opcount_threshold": 1, "no_such_option": 2})
    assert cpu_fused._inductor_options() == {"realize_cpu_opcount_threshold": 1}
