"""The spec's saturation jitter (kernels/spec.py): drawn last, so every earlier draw, and every
figure recorded before it existed, is unchanged; identity and views leave it at 1; its range is
validated. The engines' results with it on are compared in tests/test_engines.py."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from kernels.spec import AugConfig, AugParams, View, identity_params, sample_params, view_params

# sample_params(3, AugConfig(erase_p=0.5), torch.Generator().manual_seed(2024)) as drawn before
# saturation existed (commit 7e92cc5): each field's float32 values, exactly.
RECORDED = {
    "flip": [True, True, False],
    "angle": [7.911960601806641, 3.3035049438476562, 11.741378784179688],
    "scale": [1.0817899703979492, 1.0330345630645752, 1.0357251167297363],
    "tx": [-0.10926897823810577, 0.0012294501066207886, -0.11397679150104523],
    "ty": [0.11952580511569977, -0.16865018010139465, -0.1717764139175415],
    "brightness": [0.9188733696937561, 0.8276638388633728, 1.1930952072143555],
    "contrast": [1.0787798166275024, 1.076265811920166, 0.9762381315231323],
    "erase": [False, False, False],
    "ex": [0.5339417457580566, 0.1225615069270134, 0.39717018604278564],
    "ey": [0.14843551814556122, 0.5230145454406738, 0.6652171611785889],
    "ew": [0.2873309254646301, 0.19418247044086456, 0.2939433157444],
    "eh": [0.1443428099155426, 0.2577081620693207, 0.28203603625297546],
}


def old_sample_params(n: int, cfg: AugConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A copy of sample_params as it was before saturation: the draw order every recorded figure used."""
    def rand():
        return torch.rand(n, generator=generator)

    def uniform(lo, hi):
        return lo + (hi - lo) * rand()

    erase = rand() < cfg.erase_p
    area = uniform(*cfg.erase_area)
    ratio = torch.exp(uniform(math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])))
    ew = torch.sqrt(area / ratio).clamp(max=1.0)
    eh = torch.sqrt(area * ratio).clamp(max=1.0)
    ex = rand() * (1.0 - ew)
    ey = rand() * (1.0 - eh)
    return dict(flip=rand() < cfg.flip_p, angle=uniform(-cfg.max_angle, cfg.max_angle), scale=uniform(*cfg.scale),
                tx=2.0 * uniform(-cfg.max_shift, cfg.max_shift), ty=2.0 * uniform(-cfg.max_shift, cfg.max_shift),
                brightness=uniform(1.0 - cfg.brightness, 1.0 + cfg.brightness),
                contrast=uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast), erase=erase, ex=ex, ey=ey, ew=ew, eh=eh)


def test_saturation_is_the_last_field():
    assert [f.name for f in fields(AugParams)][-1] == "saturation"


@pytest.mark.parametrize("saturation", [0.0, 0.3])
def test_earlier_draws_are_the_recorded_ones(saturation):
    params = sample_params(3, AugConfig(erase_p=0.5, saturation=saturation), torch.Generator().manual_seed(2024))
    for name, values in RECORDED.items():
        got = getattr(params, name)
        want = torch.tensor(values, dtype=got.dtype)
        assert torch.equal(got, want), name


@pytest.mark.parametrize("cfg", [AugConfig(), AugConfig(erase_p=0.7, max_angle=40, saturation=0.4),
                                 AugConfig(saturation=0.99, brightness=0.5, contrast=0.1, scale=(0.5, 2.0))])
def test_every_field_but_saturation_draws_as_before(cfg):
    params = sample_params(50, cfg, torch.Generator().manual_seed(7))
    before = old_sample_params(50, cfg, torch.Generator().manual_seed(7))
    for name, want in before.items():
        assert torch.equal(getattr(params, name), want), name


def test_saturation_draw_range_and_generator_state():
    g = torch.Generator().manual_seed(3)
    params = sample_params(2000, AugConfig(saturation=0.3), g)
    s = params.saturation
    assert s.dtype == torch.float32 and s.shape == (2000,)
    assert 0.7 <= s.min().item() < 0.72 and 1.28 < s.max().item() <= 1.3  # U(1 - 0.3, 1 + 0.3)
    # Without saturation nothing extra is drawn: the generator ends where it always did, so a
    # caller drawing more from it afterwards also sees what it saw before.
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_params(8, AugConfig(), g0).saturation, torch.ones(8))
    old_sample_params(8, AugConfig(), g1)
    assert torch.equal(torch.rand(4, generator=g0), torch.rand(4, generator=g1))


def test_identity_views_and_no_augmentation_leave_saturation_at_one():
    assert torch.equal(identity_params(4).saturation, torch.ones(4))
    assert torch.equal(view_params(4, View(1.1, 0.1, 0.0, True)).saturation, torch.ones(4))
    assert AugConfig.none().saturation == 0.0
    assert torch.equal(sample_params(4, AugConfig.none(), torch.Generator().manual_seed(0)).saturation,
                       torch.ones(4))
    params = sample_params(6, AugConfig(saturation=0.5), torch.Generator().manual_seed(1))
    assert torch.equal(params[1:3].saturation, params.saturation[1:3])  # indexing and .to keep it
    assert torch.equal(params.to("cpu").saturation, params.saturation)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_saturation_range_is_validated(bad):
    with pytest.raises(ValueError, match="saturation"):
        AugConfig(saturation=bad)
