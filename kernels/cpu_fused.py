"""The augmentation spec written for torch.compile on CPU: the resident loader's CPU engine.

The reference (`reference.py`) is the readable definition, but on a CPU it runs as
~10 separate passes over the output (affine_grid, grid_sample, jitter, normalise,
channel expand, erase, layout copy), which at 224 px made it slower than the
per-image DataLoader baseline. Here the same math is element-wise arithmetic plus
four gathers, compiled by inductor into two vectorised loops:

1. `gray_stage`: per output pixel, the inverse affine map, bilinear sampling of the
   uint8 source and the jitter, into one (B, S, S) float32 plane.
2. `finish_stage`: normalise, replicate gray to C channels, erase, cast, writing the
   channels-last output once.

Why two loops, not one: fused into the C-innermost output loop, inductor either
redoes the four gathers per channel or falls back to scalar code; a gray plane
read back once costs less (measured in benchmarks/RESULTS.md). Both stages write
into caller-given buffers, which `CpuAugmenter` reuses (see `buffers.py`).
Tests hold the result to the reference.
"""
from __future__ import annotations

import functools

import torch

from kernels.buffers import BufferPool
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


def gray_stage(images: torch.Tensor, index: torch.Tensor, params: AugParams, size: int,
               into: torch.Tensor) -> torch.Tensor:
    """images[index] warped, sampled and jittered -> `into`, (B, size, size) float32 on [0, 1]."""
    device = images.device
    b, s = index.shape[0], size
    h, w = images.shape[1], images.shape[2]
    t = params.inverse_affine().to(device)
    # Output pixel x has normalised centre (2x + 1)/s - 1 and a normalised source
    # coordinate u maps to source pixel ((u + 1) * w - 1) / 2 (align_corners=False).
    # Folding both into per-sample coefficients leaves ix = ax*x + bx*y + cx per pixel.
    k = 1.0 / s - 1.0
    ax, bx = t[:, 0, 0] * (w / s), t[:, 0, 1] * (w / s)
    cx = (t[:, 0, 0] * k + t[:, 0, 1] * k + t[:, 0, 2] + 1) * (w / 2) - 0.5
    ay, by = t[:, 1, 0] * (h / s), t[:, 1, 1] * (h / s)
    cy = (t[:, 1, 0] * k + t[:, 1, 1] * k + t[:, 1, 2] + 1) * (h / 2) - 0.5
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
    p00 = per_sample(index.int() * (h * w)) + yi * w + xi  # int32: the data set is < 2**31 px
    v00, v01 = flat[p00].float(), flat[p00 + dx].float()
    v10, v11 = flat[p00 + dy].float(), flat[p00 + dy + dx].float()
    top = v00 + (v01 - v00) * fx
    bottom = v10 + (v11 - v10) * fx
    v = (top + (bottom - top) * fy) * (1.0 / 255.0)
    gain = per_sample(params.brightness.to(device).float())
    contrast = per_sample(params.contrast.to(device).float())
    into.copy_((gain * (0.5 + contrast * (v - 0.5))).clamp(0.0, 1.0))
    return into


def finish_stage(gray: torch.Tensor, params: AugParams, out: OutputSpec,
                 into: torch.Tensor) -> torch.Tensor:
    """Normalise, replicate, erase, cast: gray (B, S, S) -> `into`, (B, S, S, C) = channels-last."""
    device = gray.device
    b, s = gray.shape[0], gray.shape[1]
    box = erase_box(params, s).to(device).view(b, 4, 1, 1)
    cols = torch.arange(s, device=device)
    cx, cy = cols.view(1, 1, s), cols.view(1, s, 1)
    erased = (cx >= box[:, 0]) & (cx < box[:, 2]) & (cy >= box[:, 1]) & (cy < box[:, 3])
    mean, std = out.channel_stats()
    mean_t = torch.tensor(mean, device=device)
    inv_std = 1.0 / torch.tensor(std, device=device)
    into.copy_(torch.where(erased[..., None], 0.0, (gray[..., None] - mean_t) * inv_std))
    return into


def augment_eager(images: torch.Tensor, index: torch.Tensor, params: AugParams,
                  out: OutputSpec) -> torch.Tensor:
    """The two stages run eagerly into fresh buffers: same contract and result as `augment_reference`."""
    b, s = index.shape[0], out.size
    gray = gray_stage(images, index, params, s, torch.empty(b, s, s, device=images.device))
    result = torch.empty(b, s, s, out.channels, dtype=out.dtype, device=images.device)
    return finish_stage(gray, params, out, result).permute(0, 3, 1, 2)


@functools.cache
def _compiled_stages():
    compile_ = functools.partial(torch.compile, dynamic=False, options=_inductor_options())
    return compile_(gray_stage), compile_(finish_stage)


class CpuAugmenter:
    """`augment_eager` compiled (once per batch shape), writing into reused buffers.

    The gray plane is private and always reused; output batches come from a
    `BufferPool`, so memory is reused only once the caller has let go of a batch.
    """

    def __init__(self):
        self._gray_stage, self._finish_stage = _compiled_stages()
        self._gray: torch.Tensor | None = None
        self._outputs = BufferPool()

    def __call__(self, images: torch.Tensor, index: torch.Tensor, params: AugParams,
                 out: OutputSpec) -> torch.Tensor:
        b, s, device = index.shape[0], out.size, images.device
        if self._gray is None or self._gray.shape != (b, s, s) or self._gray.device != device:
            self._gray = torch.empty(b, s, s, device=device)
        gray = self._gray_stage(images, index, params, s, self._gray)
        result = self._outputs.get((b, s, s, out.channels), out.dtype, device)
        return self._finish_stage(gray, params, out, result).permute(0, 3, 1, 2)


def compiled_engine() -> CpuAugmenter:
    """A fresh CPU engine (the compiled code is shared; the buffers are its own)."""
    return CpuAugmenter()
