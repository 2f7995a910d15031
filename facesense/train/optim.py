"""Optimisation pieces: optimizer, warm-up + cosine schedule, class weights, weight EMA."""
from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3
from torch import nn

from facesense.core.config import TrainConfig


def make_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """timm's weight EMA (parameters and BN statistics), updated in place on the device (no host sync).

    The decay ramps up as 1 - (1 + step)^-3/4 (timm's warm-up; early weights fade fast) and is capped at
    `decay`: 0.999 is reached after ~10k steps.
    """
    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=3 / 4)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """lr multiplier per step: linear warm-up to 1, then cosine annealing to min_ratio."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]  # biases, norms
    # Fused CUDA kernels; they also let a float16 GradScaler skip its per-step host sync.
    fused = True if device.type == "cuda" else None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=fused)


def class_weights(cfg: TrainConfig, manifest: dict, device: torch.device) -> torch.Tensor | None:
    """'balanced': n / (k * count_c) from the train split's class counts (0 for absent classes)."""
    if cfg.class_weights == "none":
        return None
    counts = torch.tensor([manifest["splits"]["train"]["class_counts"][c] for c in manifest["classes"]],
                          dtype=torch.float32)
    weights = counts.sum() / (len(counts) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, 0.0).to(device)
