"""Output buffers that are reused once nobody holds them any more.

A large fresh tensor is a fresh mmap from glibc, so every batch would pay page
faults and the kernel zeroing its pages: at 224 px a large share of the CPU
engine's time (benchmarks/RESULTS.md, Loaders). The pool hands the same memory
back instead, but only when no tensor or view of it is alive, so a caller that
keeps batches, e.g. `list(loader)`, still gets distinct tensors: reuse never
changes results.

Whether anything still holds a buffer is read from its storage's reference count,
which only torch's private `torch._C._storage_Use_Count` reports. It is checked
once, at import, for being there and counting a view as a reference; where it
fails that check, the pool falls back to plain allocation (a fresh tensor per
call): slower, never wrong.
"""
from __future__ import annotations

import torch


def _checked_use_count():
    """torch._C._storage_Use_Count if it counts references to a storage as the pool needs, else None."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    try:
        t = torch.empty(1)
        alone = use_count(t.untyped_storage()._cdata)
        view = t.view(1)
        held = use_count(t.untyped_storage()._cdata)
        del view
        ok = held == alone + 1 and use_count(t.untyped_storage()._cdata) == alone
    except Exception:  # a changed private API: fall back, never fail
        return None
    return use_count if ok else None


_USE_COUNT = _checked_use_count()


class BufferPool:
    """Hands out tensors of a given shape/dtype, reusing those the caller has released."""

    def __init__(self, max_buffers: int = 2):
        self.max_buffers = max_buffers  # per shape: the batch the consumer holds + the next one
        self.reuse = _USE_COUNT is not None  # False: plain allocation, nothing is kept
        self._free_refs: dict[tuple, int] = {}  # refs a buffer has when only the pool holds it
        self._buffers: dict[tuple, list[torch.Tensor]] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (tuple(shape), dtype, str(device))
        pool = self._buffers.setdefault(key, [])
        for buf in pool:
            if _refs(buf) == self._free_refs[key]:
                return buf.view(shape)  # a view holds a reference: the buffer is busy while it lives
        buf = torch.empty(shape, dtype=dtype, device=device)
        if len(pool) < self.max_buffers:
            self._free_refs[key] = _refs(buf)
            pool.append(buf)
            return buf.view(shape)
        return buf


def _refs(t: torch.Tensor) -> int:
    """References to t's storage (tensors, views, numpy arrays of it)."""
    return _USE_COUNT(t.untyped_storage()._cdata)
