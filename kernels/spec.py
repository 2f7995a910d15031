"""The augmentation spec: what to draw per sample, and what the output looks like.

Every engine (pure-torch reference, fused Triton kernel, DALI pipeline) takes the
same `AugParams` and the same `OutputSpec` and must produce the same images. The
random draw happens here, once per sample, so engines never disagree on chance.

Conventions (all engines follow them; the reference in `reference.py` is the spec):

* Source images are (N, H, W) uint8 (gray) or (N, H, W, C) uint8 with C in {1, 3}
  (RGB order); H != W is allowed. A 1-channel source gives 1 or 3 output channels
  (gray replicated); a 3-channel source gives 3 (asking it for 1 is an error: pack
  the data with --channels 1 instead, so gray is made once, by one rule).
* Geometry works in normalised coordinates per axis, [-1, 1] from the left/top edge
  of the first pixel to the right/bottom edge of the last one, for the source (W
  columns, H rows) and the S x S output alike, so pixel k of an S-pixel row has its
  centre at (2k + 1) / S - 1 (torch's `align_corners=False`, as grid_sample). A
  non-square source is thus stretched to the square output by the same one pass.
  x grows right, y grows down.
* The forward map that moves image content is  p_out = s * R(a) * F * p_src + t
  (flip F, then rotate, then scale, then shift). Engines need the inverse map
  p_src = F * R(-a) * (p_out - t) / s, given by `AugParams.inverse_affine()`.
  A positive angle turns the content counter-clockwise on screen, as in
  torchvision's `rotate`.
* Sampling is bilinear at output pixel centres; points outside the source are
  clamped to the border (border replication, grid_sample's padding "border").
* Jitter on [0, 1] intensities: v = clamp(b * (0.5 + c * (x - 0.5)), 0, 1),
  i.e. contrast about mid-grey (not the image mean, so it stays per-pixel and
  fusable), then brightness as a gain.
* Saturation, after that clamp and only for 3-channel sources (no effect on gray):
  l = 0.299 r + 0.587 g + 0.114 b (ITU-R 601 luma, the weights gray packs use), then
  v = clamp(l + s * (v - l), 0, 1) per channel; s = 1 is the identity, 0 is gray.
* Random erasing sets a box of output pixels to 0 *after* normalisation (the
  mean, in every channel). The box in pixels is `erase_box(params, size)`.
* Normalise per output channel: (v - mean[c]) / std[c]; gray is replicated to C
  channels; the result is channels-last in the requested dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class AugConfig:
    """Ranges the per-sample parameters are drawn from."""

    flip_p: float = 0.5  # probability of a horizontal flip
    max_angle: float = 15.0  # rotation angle drawn from U(-max_angle, +max_angle), degrees
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor range (>1 zooms in)
    max_shift: float = 0.1  # shift drawn from U(-max_shift, +max_shift), fraction of the image side
    brightness: float = 0.2  # gain drawn from U(1 - brightness, 1 + brightness)
    contrast: float = 0.2  # contrast factor drawn from U(1 - contrast, 1 + contrast)
    # Saturation factor drawn from U(1 - saturation, 1 + saturation); colour sources only.
    # Default 0 (and drawn last, and only when > 0): every draw made before it existed is unchanged.
    saturation: float = 0.0
    erase_p: float = 0.0  # probability of random erasing
    erase_area: tuple[float, float] = (0.02, 0.2)  # erased box area, fraction of the image
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # erased box aspect ratio h/w (log-uniform)

    def __post_init__(self):
        checks = {
            "flip_p": 0.0 <= self.flip_p <= 1.0,
            "erase_p": 0.0 <= self.erase_p <= 1.0,
            "max_angle": 0.0 <= self.max_angle <= 180.0,
            "scale": 0.0 < self.scale[0] <= self.scale[1],
            "max_shift": 0.0 <= self.max_shift <= 1.0,
            "brightness": 0.0 <= self.brightness < 1.0,
            "contrast": 0.0 <= self.contrast < 1.0,
            "saturation": 0.0 <= self.saturation < 1.0,
            "erase_area": 0.0 < self.erase_area[0] <= self.erase_area[1] <= 1.0,
            "erase_ratio": 0.0 < self.erase_ratio[0] <= self.erase_ratio[1],
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"AugConfig: invalid {', '.join(bad)}: {self}")

    @classmethod
    def none(cls) -> "AugConfig":
        """No augmentation: every draw is the identity (eval mode)."""
        return cls(flip_p=0.0, max_angle=0.0, scale=(1.0, 1.0), max_shift=0.0,
                   brightness=0.0, contrast=0.0, saturation=0.0, erase_p=0.0)


@dataclass(frozen=True)
class OutputSpec:
    """What the engines write: size, channels, normalisation, dtype (always channels-last)."""

    size: int = 48  # output side in pixels (48..224); resizing happens inside the one sampling pass
    channels: int = 1  # 1 (gray) or 3 (gray replicated)
    mean: tuple[float, ...] = (0.5,)  # per-channel mean on the [0, 1] scale (one value = all channels)
    std: tuple[float, ...] = (0.25,)  # per-channel std on the [0, 1] scale
    dtype: torch.dtype = torch.float32  # float32, float16 or bfloat16

    def __post_init__(self):
        if not 8 <= self.size <= 1024:
            raise ValueError(f"OutputSpec: size {self.size} out of range 8..1024")
        if self.channels not in (1, 3):
            raise ValueError(f"OutputSpec: channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ValueError(f"OutputSpec: {name} needs 1 or {self.channels} values")
        if any(s <= 0 for s in self.std):
            raise ValueError("OutputSpec: std must be positive")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"OutputSpec: dtype must be float32/float16/bfloat16, got {self.dtype}")

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Mean and std expanded to one value per output channel."""
        mean = list(self.mean) * (self.channels if len(self.mean) == 1 else 1)
        std = list(self.std) * (self.channels if len(self.std) == 1 else 1)
        return mean, std


@dataclass
class AugParams:
    """Per-sample parameters, each a 1-D tensor of length B (float32 unless noted)."""

    flip: torch.Tensor  # bool: mirror left-right
    angle: torch.Tensor  # degrees, counter-clockwise on screen
    scale: torch.Tensor  # zoom factor
    tx: torch.Tensor  # shift right, normalised units (2.0 = one image side)
    ty: torch.Tensor  # shift down, normalised units
    brightness: torch.Tensor  # gain
    contrast: torch.Tensor  # contrast about mid-grey
    erase: torch.Tensor  # bool: apply the erase box
    ex: torch.Tensor  # erase box left edge, fraction of the side
    ey: torch.Tensor  # erase box top edge, fraction of the side
    ew: torch.Tensor  # erase box width, fraction of the side
    eh: torch.Tensor  # erase box height, fraction of the side
    saturation: torch.Tensor  # saturation factor (1 = unchanged); last: it was added last

    def __len__(self) -> int:
        return self.flip.shape[0]

    def to(self, device) -> "AugParams":
        return AugParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index) -> "AugParams":
        return AugParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def inverse_affine(self) -> torch.Tensor:
        """(B, 2, 3) float32: output normalised coords -> source normalised coords.

        p_src = F R(-a) (p_out - t) / s; with y pointing down, R(-a) for a
        counter-clockwise on-screen turn is [[cos, -sin], [sin, cos]].
        """
        a = torch.deg2rad(self.angle.float())
        cos, sin = torch.cos(a), torch.sin(a)
        inv_s = 1.0 / self.scale.float()
        fx = torch.where(self.flip, -1.0, 1.0).to(cos)
        # Linear part L = F R(-a) / s: the flip negates the first row.
        l00, l01 = fx * cos * inv_s, -fx * sin * inv_s
        l10, l11 = sin * inv_s, cos * inv_s
        tx, ty = self.tx.float(), self.ty.float()
        c0 = -(l00 * tx + l01 * ty)
        c1 = -(l10 * tx + l11 * ty)
        return torch.stack([torch.stack([l00, l01, c0], 1), torch.stack([l10, l11, c1], 1)], 1)


def identity_params(n: int, device="cpu") -> AugParams:
    """Parameters that leave every image unchanged (up to the resize)."""
    def full(value, dtype=torch.float32):  # a fresh tensor per field: callers may edit one
        return torch.full((n,), value, dtype=dtype, device=device)

    return AugParams(flip=full(False, torch.bool), angle=full(0.0), scale=full(1.0),
                     tx=full(0.0), ty=full(0.0), brightness=full(1.0), contrast=full(1.0),
                     erase=full(False, torch.bool), ex=full(0.0), ey=full(0.0),
                     ew=full(0.0), eh=full(0.0), saturation=full(1.0))


@dataclass(frozen=True)
class View:
    """One fixed view for test-time augmentation: zoom, shift and mirror, no randomness.

    The shift is in normalised units like AugParams.tx/ty (2.0 = one image side); the view is
    sampled by the same single affine pass as training's augmentation.
    """

    scale: float = 1.0  # zoom factor (>1 zooms in)
    tx: float = 0.0  # shift right, normalised units
    ty: float = 0.0  # shift down, normalised units
    flip: bool = False  # mirror left-right


def view_params(n: int, view: View, device="cpu") -> AugParams:
    """Parameters that show every one of n images through `view`."""
    params = identity_params(n, device)
    params.flip.fill_(view.flip)
    params.scale.fill_(view.scale)
    params.tx.fill_(view.tx)
    params.ty.fill_(view.ty)
    return params


def crop_views(zoom: float = 1.1) -> list[View]:
    """The ten-crop idea on the affine sampler: the whole image and four corner crops at `zoom`, each
    also mirrored. A corner view's shift (zoom - 1) puts the crop's edge on the image's edge."""
    d = zoom - 1.0
    places = [View()] + [View(zoom, sx * d, sy * d) for sx in (-1, 1) for sy in (-1, 1)]
    return places + [View(v.scale, v.tx, v.ty, flip=True) for v in places]


def sample_params(n: int, cfg: AugConfig, generator: torch.Generator | None = None,
                  device=None) -> AugParams:
    """Draw parameters for n samples on `device` (the generator's device; default CPU).

    Drawing on the training device keeps the per-batch path free of host copies.
    The draw order is fixed (recorded figures depend on it): fields added later are drawn
    after all others, and saturation only when its range is not empty, so a config without
    it leaves the generator exactly where it did before saturation existed.
    """
    device = generator.device if generator is not None else (device or "cpu")

    def rand() -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * rand()

    erase = rand() < cfg.erase_p
    area = uniform(*cfg.erase_area)
    log_ratio = uniform(math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1]))
    ratio = torch.exp(log_ratio)
    ew = torch.sqrt(area / ratio).clamp(max=1.0)
    eh = torch.sqrt(area * ratio).clamp(max=1.0)
    ex = rand() * (1.0 - ew)
    ey = rand() * (1.0 - eh)
    return AugParams(
        flip=rand() < cfg.flip_p,
        angle=uniform(-cfg.max_angle, cfg.max_angle),
        scale=uniform(*cfg.scale),
        tx=2.0 * uniform(-cfg.max_shift, cfg.max_shift),
        ty=2.0 * uniform(-cfg.max_shift, cfg.max_shift),
        brightness=uniform(1.0 - cfg.brightness, 1.0 + cfg.brightness),
        contrast=uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast),
        erase=erase, ex=ex, ey=ey, ew=ew, eh=eh,
        # Keyword arguments are evaluated in order: this is the last draw.
        saturation=(uniform(1.0 - cfg.saturation, 1.0 + cfg.saturation) if cfg.saturation > 0
                    else torch.ones(n, device=device)),
    )


def erase_box(params: AugParams, size: int) -> torch.Tensor:
    """(B, 4) int32 box [x0, y0, x1, y1) in output pixels; empty (0,0,0,0) where not erasing.

    Pixel (x, y) is erased iff x0 <= x < x1 and y0 <= y < y1.
    """
    x0 = torch.floor(params.ex * size)
    y0 = torch.floor(params.ey * size)
    x1 = torch.floor((params.ex + params.ew) * size).clamp(max=size)
    y1 = torch.floor((params.ey + params.eh) * size).clamp(max=size)
    box = torch.stack([x0, y0, x1, y1], 1).to(torch.int32)
    return torch.where(params.erase[:, None], box, torch.zeros_like(box))


__all__ = ["AugConfig", "OutputSpec", "AugParams", "View", "identity_params", "view_params", "crop_views",
           "sample_params", "erase_box"]
