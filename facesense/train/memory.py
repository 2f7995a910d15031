"""Will a training configuration fit in memory? Refuse before starting what cannot.

`--img-size 1024` used to grow until the kernel killed the process without a word.
The estimate: every layer's output for one image, found by running the model on the
`meta` device (shapes only: no memory, no compute), times the batch size (what
autograd keeps for the backward pass), plus weights, gradients and optimizer state
and the loader's batches. Measured for EfficientNet-B0, batch 128 at 96 px: estimate
2.0 GiB, peak 2.1 GiB. AMP halves the activations (16-bit), roughly.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from facesense.core.errors import FaceSenseError

GB = 1e9


def activation_bytes(model: nn.Module, channels: int, img_size: int) -> int:
    """Bytes of all leaf-module outputs of one float32 image in train mode (what backward keeps).

    Measured on a batch of two, halved: at small sizes (--img-size 8 to 32) a network's last
    feature maps are 1x1, and BatchNorm refuses a train-mode batch of one such value per channel.
    """
    meta = copy.deepcopy(model).to("meta").train()
    total = 0

    def count(module, inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in meta.modules() if next(m.children(), None) is None]
    try:
        meta(torch.empty(2, channels, img_size, img_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total // 2


def training_bytes(model: nn.Module, channels: int, img_size: int, batch_size: int, amp: bool) -> int:
    """Estimated peak memory of one training step: activations, weights + grads + AdamW moments, batches."""
    activations = activation_bytes(model, channels, img_size) * batch_size // (2 if amp else 1)
    params = sum(p.numel() for p in model.parameters()) * 4 * 4
    batches = 3 * batch_size * channels * img_size * img_size * 4
    return activations + params + batches


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process: the GPU's free memory, or the host's MemAvailable (None if unknown)."""
    from pipeline.residency import free_memory

    return free_memory(device) or None


def check_fits(model: nn.Module, channels: int, img_size: int, batch_size: int, amp: bool, model_name: str,
               device: torch.device) -> None:
    """FaceSenseError when the estimate exceeds the memory available (shared by ranks on one CPU host)."""
    free = available_bytes(device)
    if free is None:
        return
    if device.type == "cpu":
        free //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = training_bytes(model, channels, img_size, batch_size, amp)
    if need > free:
        raise FaceSenseError(f"--img-size {img_size} with --batch-size {batch_size} needs about {need / GB:.1f} GB "
                             f"to train {model_name} (estimated), {free / GB:.1f} GB is free on {device}; "
                             f"lower --batch-size or --img-size")
