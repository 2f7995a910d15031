"""Pure-torch batched augmentation: the definition every faster engine is tested against.

One `affine_grid` + `grid_sample` pass does flip, rotation, scale, shift and the
resize to the output size together (one interpolation, not a chain that blurs at
every step); the rest is element-wise. Runs on CPU and GPU; no per-image loop.
Sources of any H x W and 1 or 3 channels (conventions in `spec.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.spec import AugParams, OutputSpec, erase_box

# ITU-R 601 luma weights (r, g, b): the saturation jitter's gray, as pack's gray conversion.
LUMA = (0.299, 0.587, 0.114)


def source_channels(images: torch.Tensor, out: OutputSpec) -> int:
    """C_in of an (N, H, W) or (N, H, W, C) uint8 source; ValueError where no engine can serve `out`."""
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C) uint8, got {tuple(images.shape)} "
                         f"{images.dtype}")
    c_in = 1 if images.dim() == 3 else images.shape[3]
    if c_in not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c_in} (shape {tuple(images.shape)})")
    if c_in == 3 and out.channels == 1:
        raise ValueError("a 3-channel source cannot give 1-channel output: pack the data with --channels 1 "
                         "(or ask for 3 output channels)")
    return c_in


def augment_reference(images: torch.Tensor, index: torch.Tensor, params: AugParams,
                      out: OutputSpec) -> torch.Tensor:
    """Augment images[index] -> (B, C, S, S) tensor, channels-last, dtype out.dtype.

    images: (N, H, W) or (N, H, W, C) uint8 data set, C in {1, 3}, H != W allowed (resident on
    the device); index: (B,) int64. params: one entry per batch sample, on any device.
    """
    c_in = source_channels(images, out)
    assert index.dim() == 1 and len(params) == index.shape[0], "one parameter set per index"
    device = images.device
    params = params.to(device)
    b, s = index.shape[0], out.size
    src = images[index]
    src = src.unsqueeze(1) if src.dim() == 3 else src.permute(0, 3, 1, 2)
    src = src.float().div_(255.0)  # (B, C_in, H, W) on [0, 1]
    theta = params.inverse_affine().to(device)
    grid = F.affine_grid(theta, [b, c_in, s, s], align_corners=False)
    x = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)

    gain = params.brightness.float().view(b, 1, 1, 1)
    contrast = params.contrast.float().view(b, 1, 1, 1)
    x = (gain * (0.5 + contrast * (x - 0.5))).clamp_(0.0, 1.0)
    if c_in == 3:  # saturation: blend with the pixel's luma, after the jitter's clamp
        sat = params.saturation.float().view(b, 1, 1, 1)
        luma = LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]
        x = (luma + sat * (x - luma)).clamp_(0.0, 1.0)

    mean, std = out.channel_stats()
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    x = (x.expand(b, out.channels, s, s) - mean_t) / std_t  # gray replicated to C channels

    box = erase_box(params, s).to(device)
    cols = torch.arange(s, device=device)
    in_x = (cols >= box[:, 0, None]) & (cols < box[:, 2, None])  # (B, S)
    in_y = (cols >= box[:, 1, None]) & (cols < box[:, 3, None])
    erased = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)  # (B, 1, S, S)
    x = torch.where(erased, 0.0, x)
    return x.to(dtype=out.dtype, memory_format=torch.channels_last)
