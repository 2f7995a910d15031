"""What lives where: the memory budget and the resident-or-stream decision.

A split whose decoded pixels fit the budget is decoded once and kept resident (the fast
path: one uint8 tensor on the device, one augmentation call per batch); a larger one
streams, decoding each batch. The decoded size is what the loader would hold: N * H * W * C
bytes at the split's common size, or at the output side S for encoded images of differing
sizes (they are decoded to S x S, see `pipeline.decode.decode_side`).

The default budget is half of the free memory where the pixels would live: the GPU's
(torch.cuda.mem_get_info) for a CUDA run, the host's MemAvailable on CPU. Half, because
the model, its activations and the optimizer need the rest. On CPU, DDP ranks share one
host, so each rank gets its share of that half.
"""
from __future__ import annotations

import os

import torch

from pipeline.decode import decode_side


def decoded_bytes(entry: dict, count: int, out_size: int) -> int:
    """Bytes of `count` images of a manifest split entry once decoded (at decode_side)."""
    h, w = decode_side(entry, out_size)
    return int(count) * h * w * int(entry.get("channels", 1))


def host_available() -> int:
    """MemAvailable from /proc/meminfo (bytes); where there is none, free physical pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: no budget to speak of
        return 0


def free_memory(device: torch.device) -> int:
    """Free bytes where a resident split on `device` would live."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available()


def default_budget(device: torch.device, world_size: int = 1) -> int:
    """Half of the free memory of `device`; on CPU split among the ranks that share the host."""
    share = 1 if device.type == "cuda" else max(1, world_size)
    return free_memory(device) // 2 // share


def choose(kind: str, nbytes: int | None, budget: int | None) -> str:
    """auto -> resident when the pixels fit the budget (or nothing is known), else stream."""
    if kind != "auto":
        return kind
    if nbytes is None or budget is None:
        return "resident"
    return "resident" if nbytes <= budget else "stream"


def human_bytes(n: int | float) -> str:
    """66 MB, 1.2 GB: decimal units, as disks and `free -h --si` count."""
    n = float(n)
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.0f} kB"
    return f"{int(n)} B"


__all__ = ["decoded_bytes", "host_available", "free_memory", "default_budget", "choose", "human_bytes"]
