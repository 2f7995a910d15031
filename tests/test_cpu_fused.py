"""The CPU engine (the spec as element-wise maths and gathers, compiled in the loader): what only it
has. Its eager form's comparison with the reference runs in tests/test_engines.py with the other engines;
the compiled form is held to the reference here, on few shapes (each costs a compile)."""
from __future__ import annotations

import torch

from kernels.cpu_fused import augment_eager, compiled_engine
from kernels.reference import augment_reference
from kernels.spec import AugConfig, OutputSpec, identity_params, sample_params
from test_engines import COLOUR100, NONSQUARE, assert_close, output_spec, unit_scale


def test_eager_identity_and_flip_are_exact():
    images = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    out = OutputSpec()
    params = identity_params(4)
    params.flip[1::2] = True
    got = unit_scale(augment_eager(images, torch.arange(4), params, out), out)[:, 0] * 255
    expected = images.float().clone()
    expected[1::2] = expected[1::2].flip(-1)
    assert (got - expected).abs().max() < 1e-3


def test_compiled_matches_eager():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 48, 48), dtype=torch.uint8, generator=g)
    params = sample_params(6, AugConfig(erase_p=0.5), g)
    out = OutputSpec(size=64, channels=3)
    eager = augment_eager(images, torch.arange(6), params, out)
    compiled = compiled_engine()(images, torch.arange(6), params, out)
    assert (eager - compiled).abs().max() < 1e-4


def test_compiled_colour_and_non_square_match_reference():
    """The colour path (3-channel planes, saturation in the finish), 100x100 and 64x40 sources through
    one engine: one output shape, so the finish stage compiles once."""
    engine, out = compiled_engine(), output_spec(40, 3)
    cfg = AugConfig(erase_p=0.5, max_angle=30, saturation=0.5)
    for seed, source in enumerate([COLOUR100, NONSQUARE]):
        g = torch.Generator().manual_seed(seed)
        images, index = source.images(10, seed=seed), torch.tensor([3, 1, 4, 1, 5, 9])
        params = sample_params(6, cfg, g)
        got = engine(images, index, params, out)
        assert_close(got, augment_reference(images, index, params, out), out)
        assert (got - augment_eager(images, index, params, out)).abs().max() < 1e-4


def test_eager_one_channel_layout_is_gray():
    """(N, H, W, 1) is read as the (N, H, W) gray source it is: same result, bit for bit."""
    images = torch.randint(0, 256, (6, 40, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    params, out = sample_params(4, AugConfig(saturation=0.5), torch.Generator().manual_seed(4)), OutputSpec(size=32)
    index = torch.tensor([0, 5, 2, 2])
    assert torch.equal(augment_eager(images[..., None], index, params, out), augment_eager(images, index, params, out))


def test_compiled_engine_never_overwrites_a_batch_still_held():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 48, 48), dtype=torch.uint8, generator=g)
    out = OutputSpec(size=32, channels=3)
    engine = compiled_engine()
    draws = [sample_params(4, AugConfig(), g) for _ in range(4)]
    index = torch.arange(4)
    held = [engine(images, index, p, out) for p in draws]  # every batch kept alive
    for p, batch in zip(draws, held):
        assert torch.allclose(batch, augment_eager(images, index, p, out), atol=1e-4)


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
