"""Pure-torch batched augmentation: the definition every faster engine is tested against.

One `affine_grid` + `grid_sample` pass does flip, rotation, scale, shift and the
resize to the output size together (one interpolation, not a chain that blurs at
every step); the rest is element-wise. Runs on CPU and GPU; no per-image loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.spec import AugParams, OutputSpec, erase_box


def augment_reference(images: torch.Tensor, index: torch.Tensor, params: AugParams,
                      out: OutputSpec) -> torch.Tensor:
    """Augment images[index] -> (B, C, S, S) tensor, channels-last, dtype out.dtype.

    images: (N, H, W) uint8 data set (resident on the device); index: (B,) int64.
    params: one entry per batch sample, on any device.
    """
    assert images.dtype == torch.uint8 and images.dim() == 3, "images must be (N, H, W) uint8"
    assert index.dim() == 1 and len(params) == index.shape[0], "one parameter set per index"
    device = images.device
    params = params.to(device)
    b, s = index.shape[0], out.size
    src = images[index].unsqueeze(1).float().div_(255.0)  # (B, 1, H, W) on [0, 1]
    theta = params.inverse_affine().to(device)
    grid = F.affine_grid(theta, [b, 1, s, s], align_corners=False)
    x = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)

    gain = params.brightness.float().view(b, 1, 1, 1)
    contrast = params.contrast.float().view(b, 1, 1, 1)
    x = (gain * (0.5 + contrast * (x - 0.5))).clamp_(0.0, 1.0)

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
