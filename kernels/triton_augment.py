"""Fused Triton augmentation: the whole per-batch augmentation as one kernel launch.

It replaces the reference's chain (`images[index]` gather -> float /255 -> affine_grid
-> grid_sample -> jitter -> expand to C channels -> normalise -> erase mask -> cast ->
channels-last copy). Each of those steps writes and rereads a full-size batch tensor,
and at 224x224x3 in float32 that traffic, not the arithmetic, is the cost. Here each
program reads the four uint8 source pixels its output pixel needs straight from the
resident data set and writes the final value once, in the final dtype and layout.
Sources are (N, H, W) or (N, H, W, C) uint8 with C in {1, 3}, of any H x W: a 3-channel
pixel's values are read as one (BLOCK, 4) tile, which the saturation jitter needs whole.

`kernels/reference.py` defines the result; tests compare against it. The maths copies
grid_sample(bilinear, padding_mode="border", align_corners=False) step by step so the
two agree to float32 rounding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kernels.reference import source_channels
from kernels.spec import AugParams, OutputSpec, erase_box

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the rest of the project must work without triton
    triton, tl, _IMPORT_ERROR = None, None, exc
else:
    _IMPORT_ERROR = None

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
N_COEF = 9  # per-sample floats in KernelParams.coef (see kernel_params), passed to the kernel


def triton_available(device: torch.device | str) -> bool:
    """True where augment_triton can run: CUDA with triton, or CPU under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    # The interpreter is chosen when @triton.jit runs (at import), so the variable must
    # have been set before this module was imported, not just now.
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _augment_kernel(images_ptr, index_ptr, coef_ptr, box_ptr, out_ptr,
                        H, W, S,
                        mean0, mean1, mean2, std0, std1, std2,
                        C: tl.constexpr, C_IN: tl.constexpr, C_PAD: tl.constexpr, N_COEF: tl.constexpr,
                        BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # int64: b * S*S*C can pass 2**31 for big batches
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # flat output pixel ids
        live = p < S * S
        ox, oy = p % S, p // S

        # Per-sample scalars, computed before the launch by kernel_params (tiny tensors):
        # inverse affine rows, brightness gain, contrast, saturation; the erase box in pixels.
        a00 = tl.load(coef_ptr + b * N_COEF + 0)
        a01 = tl.load(coef_ptr + b * N_COEF + 1)
        a02 = tl.load(coef_ptr + b * N_COEF + 2)
        a10 = tl.load(coef_ptr + b * N_COEF + 3)
        a11 = tl.load(coef_ptr + b * N_COEF + 4)
        a12 = tl.load(coef_ptr + b * N_COEF + 5)
        gain = tl.load(coef_ptr + b * N_COEF + 6)
        contrast = tl.load(coef_ptr + b * N_COEF + 7)
        ex0 = tl.load(box_ptr + b * 4 + 0)
        ey0 = tl.load(box_ptr + b * 4 + 1)
        ex1 = tl.load(box_ptr + b * 4 + 2)
        ey1 = tl.load(box_ptr + b * 4 + 3)

        # Output pixel centre in normalised coords, then the source point it comes from.
        xn = (2 * ox + 1).to(tl.float32) / S - 1.0
        yn = (2 * oy + 1).to(tl.float32) / S - 1.0
        xs = a00 * xn + a01 * yn + a02
        ys = a10 * xn + a11 * yn + a12
        # grid_sample's unnormalise + border clip; clipping first is what makes "border"
        # replicate the edge pixel instead of blending towards zero.
        ix = tl.minimum(tl.maximum(((xs + 1.0) * W - 1.0) / 2.0, 0.0), W - 1.0)
        iy = tl.minimum(tl.maximum(((ys + 1.0) * H - 1.0) / 2.0, 0.0), H - 1.0)
        x0f, y0f = tl.floor(ix), tl.floor(iy)
        x1f, y1f = x0f + 1.0, y0f + 1.0
        x0, y0 = x0f.to(tl.int32), y0f.to(tl.int32)
        # At ix == W-1 the right neighbour is off the image but has weight 0; clamping its
        # index keeps the load in bounds without changing the value.
        x1, y1 = tl.minimum(x0 + 1, W - 1), tl.minimum(y0 + 1, H - 1)

        # grid_sample's bilinear weights (nw, ne, sw, se), written the same way so
        # float32 rounding stays close to the reference's.
        w00 = (x1f - ix) * (y1f - iy)
        w01 = (ix - x0f) * (y1f - iy)
        w10 = (x1f - ix) * (iy - y0f)
        w11 = (ix - x0f) * (iy - y0f)
        # Gather straight from the resident uint8 data set: no images[index] copy.
        src = images_ptr + tl.load(index_ptr + b).to(tl.int64) * H * W * C_IN
        c = tl.arange(0, C_PAD)
        if C_IN == 1:
            v00 = tl.load(src + y0 * W + x0, mask=live, other=0).to(tl.float32) / 255.0
            v01 = tl.load(src + y0 * W + x1, mask=live, other=0).to(tl.float32) / 255.0
            v10 = tl.load(src + y1 * W + x0, mask=live, other=0).to(tl.float32) / 255.0
            v11 = tl.load(src + y1 * W + x1, mask=live, other=0).to(tl.float32) / 255.0
            v = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            v = tl.minimum(tl.maximum(gain * (0.5 + contrast * (v - 0.5)), 0.0), 1.0)
            v = v[:, None]  # gray, replicated to the C output channels by broadcasting
        else:
            # A pixel's C_IN interleaved values as one (BLOCK, C_PAD) tile per corner.
            cm = live[:, None] & (c[None, :] < C_IN)
            v00 = tl.load(src + (y0 * W + x0)[:, None] * C_IN + c[None, :], mask=cm, other=0).to(tl.float32) / 255.0
            v01 = tl.load(src + (y0 * W + x1)[:, None] * C_IN + c[None, :], mask=cm, other=0).to(tl.float32) / 255.0
            v10 = tl.load(src + (y1 * W + x0)[:, None] * C_IN + c[None, :], mask=cm, other=0).to(tl.float32) / 255.0
            v11 = tl.load(src + (y1 * W + x1)[:, None] * C_IN + c[None, :], mask=cm, other=0).to(tl.float32) / 255.0
            v = (w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11)
            v = tl.minimum(tl.maximum(gain * (0.5 + contrast * (v - 0.5)), 0.0), 1.0)
            # Saturation: blend with the ITU-R 601 luma of the jittered pixel, then clamp.
            sat = tl.load(coef_ptr + b * N_COEF + 8)
            r = tl.sum(tl.where(c[None, :] == 0, v, 0.0), axis=1)
            g = tl.sum(tl.where(c[None, :] == 1, v, 0.0), axis=1)
            bl = tl.sum(tl.where(c[None, :] == 2, v, 0.0), axis=1)
            luma = (0.299 * r + 0.587 * g + 0.114 * bl)[:, None]
            v = tl.minimum(tl.maximum(luma + sat * (v - luma), 0.0), 1.0)

        # Normalise as a (BLOCK, C_PAD) tile: channels-last keeps a pixel's C values
        # adjacent, so one masked 2-D store writes the final layout.
        mean = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))
        std = tl.where(c == 0, std0, tl.where(c == 1, std1, std2))
        y = (v - mean[None, :]) / std[None, :]
        erased = (ox >= ex0) & (ox < ex1) & (oy >= ey0) & (oy < ey1)
        y = tl.where(erased[:, None], 0.0, y)

        if out_ptr.dtype.element_ty == tl.bfloat16:
            # Round to nearest even by hand: the interpreter's fp32->bf16 cast truncates
            # (the GPU's rounds), which would make CPU tests disagree with the GPU. After
            # this the low 16 bits are zero, so either cast is exact. Values are finite.
            u = y.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
            y = u.to(tl.float32, bitcast=True)
        dst = out_ptr + b * S * S * C + p[:, None] * C + c[None, :]
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=live[:, None] & (c[None, :] < C))


@dataclass
class KernelParams:
    """AugParams reduced to what the kernel reads, on the kernel's device.

    coef (B, 9) float32: inverse affine rows, brightness gain, contrast, saturation; box (B, 4) int32:
    the erase box in output pixels. Row slices stay contiguous, so the resident loader
    computes them once per epoch and a batch is a slice plus one launch.
    """

    coef: torch.Tensor
    box: torch.Tensor

    def __len__(self) -> int:
        return self.coef.shape[0]

    def __getitem__(self, index) -> "KernelParams":
        return KernelParams(self.coef[index], self.box[index])


def kernel_params(params: AugParams, size: int, device: torch.device | str) -> KernelParams:
    """The kernel's per-sample inputs for `params` at output side `size` (~30 small device ops)."""
    coef = torch.cat([params.inverse_affine().reshape(-1, 6), params.brightness.float()[:, None],
                      params.contrast.float()[:, None], params.saturation.float()[:, None]], 1)
    box = erase_box(params, size)
    return KernelParams(coef.to(device=device, dtype=torch.float32).contiguous(),
                        box.to(device=device, dtype=torch.int32).contiguous())


def augment_triton(images: torch.Tensor, index: torch.Tensor, params: AugParams | KernelParams,
                   out: OutputSpec, block: int = 1024) -> torch.Tensor:
    """Augment images[index] -> (B, C, S, S) channels-last tensor of out.dtype, in one launch.

    Same contract as `augment_reference`: images (N, H, W) or (N, H, W, C) uint8, C in {1, 3},
    any H x W, contiguous on the device,
    index (B,) integer on the same device, params one entry per index on any device
    (AugParams, or KernelParams computed ahead for this output size and device).
    Index values are not range-checked: that needs a host sync every batch.
    """
    if triton is None:
        raise RuntimeError(f"augment_triton needs triton, which failed to import: {_IMPORT_ERROR}")
    assert images.dtype == torch.uint8 and images.dim() in (3, 4), \
        f"images must be (N, H, W) or (N, H, W, C) uint8, got {tuple(images.shape)} {images.dtype}"
    c_in = source_channels(images, out)  # ValueError for 3 channels in, 1 out
    assert images.is_contiguous(), "images must be contiguous (the kernel indexes it flat)"
    assert index.dim() == 1 and index.dtype in (torch.int64, torch.int32), \
        f"index must be 1-D int64/int32, got {tuple(index.shape)} {index.dtype}"
    assert len(params) == index.shape[0], \
        f"one parameter set per index: {len(params)} params for {index.shape[0]} indices"
    assert index.device == images.device, \
        f"index on {index.device} but images on {images.device}"
    assert out.dtype in _OUT_DTYPES, f"unsupported output dtype {out.dtype}"
    assert triton_available(images.device), \
        f"triton cannot run on {images.device} (CPU needs TRITON_INTERPRET=1 set before import)"
    assert block & (block - 1) == 0, "block must be a power of two"

    device, b, s, c = images.device, index.shape[0], out.size, out.channels
    if isinstance(params, AugParams):  # a dozen small device ops; loaders compute these once per epoch
        params = kernel_params(params, s, device)
    assert params.coef.device == device and params.coef.is_contiguous() and params.box.is_contiguous(), \
        "KernelParams must be contiguous and on the images' device"
    mean, std = out.channel_stats()
    mean, std = mean + [0.0] * (3 - c), std + [1.0] * (3 - c)  # pad to the kernel's 3 slots

    result = torch.empty((b, s, s, c), device=device, dtype=out.dtype)
    if b > 0:
        grid = (b, triton.cdiv(s * s, block))
        _augment_kernel[grid](images, index.contiguous(), params.coef, params.box, result,
                              images.shape[1], images.shape[2], s,
                              *mean, *std,
                              C=c, C_IN=c_in, C_PAD=triton.next_power_of_2(max(c, c_in)), N_COEF=N_COEF,
                              BLOCK=block, num_warps=4)
    return result.permute(0, 3, 1, 2)  # (B, C, S, S) view with channels-last strides


__all__ = ["KernelParams", "augment_triton", "kernel_params", "triton_available"]
