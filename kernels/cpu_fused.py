"""The augmentation spec written for torch.compile on CPU: the resident loader's CPU engine.

The reference (`reference.py`) is the readable definition, but on a CPU it runs as
~10 separate passes over the output (affine_grid, grid_sample, jitter, normalise,
channel expand, erase, layout copy), which at 224 px made it slower than the
per-image DataLoader baseline. Here the same math is element-wise arithmetic plus
four gathers per sampled value, compiled by inductor into two vectorised loops:

1. `gray_stage` (1-channel sources): per output pixel, the inverse affine map,
   bilinear sampling of the uint8 source and the jitter, into one (B, S, S) float32
   plane. `colour_stage` (3-channel sources) does the same per channel into
   (B, 3, S, S) planes: the channel is one more loop dimension of the same
   expression, so inductor vectorises it like the gray plane (x innermost).
2. `finish_stage`: saturation (colour: it needs a pixel's three channels, which
   stage 1's loop does not hold together), normalise, replicate gray to C
   channels, erase, cast, writing the channels-last output once (colour: inductor
   computes the values plane by plane and transposes them into the output in tiles).

Why two loops, not one: fused into the C-innermost output loop, inductor either
redoes the four gathers per channel or falls back to scalar code; planes read back
once cost less (measured in benchmarks/RESULTS.md). For colour the same held: one
loop computing r, g, b for the luma made inductor write each to a fresh temporary
(and a scalar channel loop), slower than the planes. A colour batch costs about 3x a
gray one at the same output size (it samples 3x the values: stage 1 ~3.1x, finish
~2.9x in CPU time, batch 256 at 224 px, 100x100 RGB against 48x48 gray sources).
Both stages write into caller-given buffers, which `CpuAugmenter` reuses (see
`buffers.py`). Tests hold the result to the reference.
"""
from __future__ import annotations

import functools

import torch

from kernels.buffers import BufferPool
from kernels.reference import LUMA, source_channels
from kernels.spec import AugParams, OutputSpec, erase_box

# Inductor's CPU heuristic materialises a pointwise expression once it exceeds 50 ops;
# the bilinear gather is ~70, and splitting it wrote two full-size temporaries per batch
# (benchmarks/RESULTS.md, Loaders). A high threshold keeps stage 1 one loop with no temporaries.
# The option exists in torch 2.11 and later; a torch without it compiles with its defaults
# (slower at large sizes, same result) instead of failing on an unknown option.
_INDUCTOR_OPTIONS = {"realize_cpu_opcount_threshold": 10_000}


def _inductor_options() -> dict:
    from torch._inductor import config

    return {name: value for name, value in _INDUCTOR_OPTIONS.items() if hasattr(config, name)}


def _pixel_map(params: AugParams, h: int, w: int, s: int, device) -> tuple[torch.Tensor, ...]:
    """(ax, bx, cx, ay, by, cy), each (B,): source pixel ix = ax*x + bx*y + cx (iy alike) of output pixel (x, y).

    Output pixel x has normalised centre (2x + 1)/s - 1 and a normalised source
    coordinate u maps to source pixel ((u + 1) * w - 1) / 2 (align_corners=False, per
    axis: w columns, h rows). Folding both into per-sample coefficients leaves one
    multiply-add per pixel and axis.
    """
    t = params.inverse_affine().to(device)
    k = 1.0 / s - 1.0
    ax, bx = t[:, 0, 0] * (w / s), t[:, 0, 1] * (w / s)
    cx = (t[:, 0, 0] * k + t[:, 0, 1] * k + t[:, 0, 2] + 1) * (w / 2) - 0.5
    ay, by = t[:, 1, 0] * (h / s), t[:, 1, 1] * (h / s)
    cy = (t[:, 1, 0] * k + t[:, 1, 1] * k + t[:, 1, 2] + 1) * (h / 2) - 0.5
    return ax, bx, cx, ay, by, cy


def _row_index(index: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """index in the dtype of the flat source offsets: int32 (faster gathers) where the data set
    has fewer than 2**31 bytes, as FER2013 and RAF-DB have; int64 for larger resident sets."""
    return index.int() if images.numel() < 2**31 else index.long()


def _sample_and_jitter(flat: torch.Tensor, p00: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                       fx: torch.Tensor, fy: torch.Tensor, gain: torch.Tensor, contrast: torch.Tensor,
                       into: torch.Tensor) -> torch.Tensor:
    """Bilinear value from the four gathers at p00 (+dx right, +dy down), then the jitter, into `into`.

    Shared by the gray and colour stages; dynamo traces through it, so each stage's graph is what
    it was when the expression was written out in place.
    """
    v00, v01 = flat[p00].float(), flat[p00 + dx].float()
    v10, v11 = flat[p00 + dy].float(), flat[p00 + dy + dx].float()
    top = v00 + (v01 - v00) * fx
    bottom = v10 + (v11 - v10) * fx
    v = (top + (bottom - top) * fy) * (1.0 / 255.0)
    into.copy_((gain * (0.5 + contrast * (v - 0.5))).clamp(0.0, 1.0))
    return into


def gray_stage(images: torch.Tensor, index: torch.Tensor, params: AugParams, size: int,
               into: torch.Tensor) -> torch.Tensor:
    """images[index] warped, sampled and jittered -> `into`, (B, size, size) float32 on [0, 1].

    images: (N, H, W) uint8 (a 1-channel (N, H, W, 1) source is passed as its (N, H, W) view).
    """
    device = images.device
    b, s = index.shape[0], size
    h, w = images.shape[1], images.shape[2]
    ax, bx, cx, ay, by, cy = _pixel_map(params, h, w, s, device)
    pix = torch.arange(s, device=device, dtype=torch.float32)
    xo, yo = pix.view(1, 1, s), pix.view(1, s, 1)

    def per_sample(v):
        return v.view(b, 1, 1)

    # Clamped source coordinates: border replication.
    ix = (per_sample(ax) * xo + (per_sample(bx) * yo + per_sample(cx))).clamp(0, w - 1)
    iy = (per_sample(ay) * xo + (per_sample(by) * yo + per_sample(cy))).clamp(0, h - 1)
    x0, y0 = ix.floor(), iy.floor()
    fx, fy = ix - x0, iy - y0
    xi, yi = x0.int(), y0.int()
    dx = (xi < w - 1).int()  # step to the right neighbour (0 on the last column)
    dy = (yi < h - 1).int() * w  # step to the row below (0 on the last row)
    flat = images.reshape(-1)
    p00 = per_sample(_row_index(index, images) * (h * w)) + yi * w + xi
    return _sample_and_jitter(flat, p00, dx, dy, fx, fy, per_sample(params.brightness.to(device).float()),
                              per_sample(params.contrast.to(device).float()), into)


def colour_stage(images: torch.Tensor, index: torch.Tensor, params: AugParams, size: int,
                 into: torch.Tensor) -> torch.Tensor:
    """images[index] (N, H, W, 3) warped, sampled and jittered -> `into`, (B, 3, size, size) float32 planes.

    The gray stage's expression with the channel as one more (outer) dimension: every value is
    four gathers from the interleaved uint8 source, and x stays the vectorised innermost loop.
    """
    device = images.device
    b, s = index.shape[0], size
    h, w, c = images.shape[1], images.shape[2], images.shape[3]
    ax, bx, cx, ay, by, cy = _pixel_map(params, h, w, s, device)
    pix = torch.arange(s, device=device, dtype=torch.float32)
    xo, yo = pix.view(1, 1, 1, s), pix.view(1, 1, s, 1)
    channel = torch.arange(c, device=device, dtype=torch.int32).view(1, c, 1, 1)

    def per_sample(v):
        return v.view(b, 1, 1, 1)

    ix = (per_sample(ax) * xo + (per_sample(bx) * yo + per_sample(cx))).clamp(0, w - 1)
    iy = (per_sample(ay) * xo + (per_sample(by) * yo + per_sample(cy))).clamp(0, h - 1)
    x0, y0 = ix.floor(), iy.floor()
    fx, fy = ix - x0, iy - y0
    xi, yi = x0.int(), y0.int()
    dx = (xi < w - 1).int() * c  # step to the right neighbour's same channel (0 on the last column)
    dy = (yi < h - 1).int() * (w * c)  # step to the row below (0 on the last row)
    flat = images.reshape(-1)
    p00 = (per_sample(_row_index(index, images) * (h * w)) + yi * w + xi) * c + channel
    return _sample_and_jitter(flat, p00, dx, dy, fx, fy, per_sample(params.brightness.to(device).float()),
                              per_sample(params.contrast.to(device).float()), into)


def finish_stage(planes: torch.Tensor, params: AugParams, out: OutputSpec,
                 into: torch.Tensor) -> torch.Tensor:
    """(Saturate,) normalise, replicate, erase, cast -> `into`, (B, S, S, C) = channels-last.

    planes: stage 1's gray (B, S, S), or colour (B, 3, S, S) which gets the saturation jitter here.
    """
    device = planes.device
    b, s = planes.shape[0], planes.shape[-1]
    if planes.dim() == 3:
        x = planes[..., None]  # gray, broadcast to C channels
    else:
        luma = (LUMA[0] * planes[:, 0] + LUMA[1] * planes[:, 1] + LUMA[2] * planes[:, 2])[..., None]
        sat = params.saturation.to(device).float().view(b, 1, 1, 1)
        x = (luma + sat * (planes.permute(0, 2, 3, 1) - luma)).clamp(0.0, 1.0)
    box = erase_box(params, s).to(device).view(b, 4, 1, 1)
    cols = torch.arange(s, device=device)
    cx, cy = cols.view(1, 1, s), cols.view(1, s, 1)
    erased = (cx >= box[:, 0]) & (cx < box[:, 2]) & (cy >= box[:, 1]) & (cy < box[:, 3])
    mean, std = out.channel_stats()
    mean_t = torch.tensor(mean, device=device)
    inv_std = 1.0 / torch.tensor(std, device=device)
    into.copy_(torch.where(erased[..., None], 0.0, (x - mean_t) * inv_std))
    return into


def _source(images: torch.Tensor, out: OutputSpec) -> tuple[torch.Tensor, int]:
    """The source as stage 1 reads it, and its channel count: (N, H, W, 1) becomes its (N, H, W) view."""
    c_in = source_channels(images, out)
    return (images.reshape(images.shape[:3]) if c_in == 1 else images), c_in


def _plane_shape(b: int, s: int, c_in: int) -> tuple[int, ...]:
    return (b, s, s) if c_in == 1 else (b, c_in, s, s)


def augment_eager(images: torch.Tensor, index: torch.Tensor, params: AugParams,
                  out: OutputSpec) -> torch.Tensor:
    """The two stages run eagerly into fresh buffers: same contract and result as `augment_reference`."""
    images, c_in = _source(images, out)
    b, s = index.shape[0], out.size
    stage = gray_stage if c_in == 1 else colour_stage
    planes = stage(images, index, params, s, torch.empty(_plane_shape(b, s, c_in), device=images.device))
    result = torch.empty(b, s, s, out.channels, dtype=out.dtype, device=images.device)
    return finish_stage(planes, params, out, result).permute(0, 3, 1, 2)


@functools.cache
def _compiled_stages():
    compile_ = functools.partial(torch.compile, dynamic=False, options=_inductor_options())
    return compile_(gray_stage), compile_(colour_stage), compile_(finish_stage)


class CpuAugmenter:
    """`augment_eager` compiled (once per batch and source shape), writing into reused buffers.

    The stage-1 planes are private and always reused; output batches come from a
    `BufferPool`, so memory is reused only once the caller has let go of a batch.
    """

    def __init__(self):
        self._gray_stage, self._colour_stage, self._finish_stage = _compiled_stages()
        self._planes: torch.Tensor | None = None
        self._outputs = BufferPool()

    def __call__(self, images: torch.Tensor, index: torch.Tensor, params: AugParams,
                 out: OutputSpec) -> torch.Tensor:
        images, c_in = _source(images, out)
        b, s, device = index.shape[0], out.size, images.device
        shape = _plane_shape(b, s, c_in)
        if self._planes is None or self._planes.shape != shape or self._planes.device != device:
            self._planes = torch.empty(shape, device=device)
        stage = self._gray_stage if c_in == 1 else self._colour_stage
        planes = stage(images, index, params, s, self._planes)
        result = self._outputs.get((b, s, s, out.channels), out.dtype, device)
        return self._finish_stage(planes, params, out, result).permute(0, 3, 1, 2)


def compiled_engine() -> CpuAugmenter:
    """A fresh CPU engine (the compiled code is shared; the buffers are its own)."""
    return CpuAugmenter()
