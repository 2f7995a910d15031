"""Batched JPEG decode on the GPU with torchvision's nvJPEG, for CUDA machines without DALI.

`torchvision.io.decode_jpeg(list_of_tensors, device="cuda")` decodes a whole batch in one
call. Files that are not JPEG (PNG from a CSV pack, BMP, ...) and batches nvJPEG refuses
(CMYK, some progressive files) go to the CPU decoder pool, so every file decodes. Gray is
nvJPEG's luma (ITU-R 601, the Y of YCbCr: what Pillow's "L" computes, to rounding).
Images of another size than the split's decode side are resized on the GPU (bilinear,
antialiased like Pillow's resize).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.decode import DecodePool

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(blob) -> bool:
    return bytes(memoryview(blob)[:3]) == JPEG_MAGIC


def nvjpeg_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import torchvision.io
    except ImportError:
        return False
    return hasattr(torchvision.io, "decode_jpeg")


def _tensor(blob) -> torch.Tensor:
    """A 1-D uint8 tensor over the file bytes (copied only when read-only, which torch refuses to share)."""
    array = np.frombuffer(blob, np.uint8) if isinstance(blob, (bytes, bytearray, memoryview)) else np.asarray(blob)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class NvjpegDecoder:
    """decode_batch(blobs, channels, size) -> (B, H, W[, 3]) uint8 on the GPU."""

    def __init__(self, device: torch.device, pool: DecodePool):
        self.device, self.pool = device, pool
        self.cpu_fallbacks = 0  # files the CPU pool decoded (not JPEG, or refused by nvJPEG)

    def decode_batch(self, blobs: list, channels: int, size: tuple[int, int]) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        shape = (len(blobs), *size) + ((3,) if channels == 3 else ())
        out = torch.empty(shape, dtype=torch.uint8, device=self.device)
        jpeg = [i for i, blob in enumerate(blobs) if is_jpeg(blob)]
        other = sorted(set(range(len(blobs))) - set(jpeg))
        if jpeg:
            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            try:
                decoded = decode_jpeg([_tensor(blobs[i]) for i in jpeg], mode=mode, device=self.device)
            except RuntimeError:  # nvJPEG refused one of them: the whole batch on the CPU pool
                other, decoded = list(range(len(blobs))), []
            self._place(out, [jpeg[k] for k in range(len(decoded))], decoded, size)
        if other:
            self.cpu_fallbacks += len(other)
            cpu = self.pool.decode_batch([blobs[i] for i in other], channels, size)
            out[torch.tensor(other, device=self.device)] = torch.from_numpy(cpu).to(self.device, non_blocking=True)
        return out

    @staticmethod
    def _place(out: torch.Tensor, where: list[int], decoded: list[torch.Tensor], size: tuple[int, int]) -> None:
        """Put (C, h, w) decodes into out[where], resizing each group of one size at once."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(decoded):
            groups.setdefault(tuple(image.shape[1:]), []).append(k)
        for hw, members in groups.items():
            stack = torch.stack([decoded[k] for k in members])  # (m, C, h, w)
            if hw != tuple(size):
                stack = F.interpolate(stack.float(), size=size, mode="bilinear", align_corners=False,
                                      antialias=True).round_().clamp_(0, 255).to(torch.uint8)
            rows = torch.tensor([where[k] for k in members], device=out.device)
            out[rows] = stack.permute(0, 2, 3, 1).reshape(out[rows].shape)


__all__ = ["NvjpegDecoder", "is_jpeg", "nvjpeg_available", "JPEG_MAGIC"]
