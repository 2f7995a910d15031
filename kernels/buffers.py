"""Output buffers that are reused once nobody holds them any more.

At 224 px a 3-channel float32 batch of 256 is 154 MB. A fresh tensor that size is
a fresh mmap from glibc (anything over 32 MB), so every batch paid ~38k page faults
and the kernel zeroing 154 MB: about a third of the CPU engine's time. The pool
hands the same memory back instead, but only when no tensor or view of it is alive
(the storage's reference count says so), so a caller that keeps batches, e.g.
`list(loader)`, still gets distinct tensors: reuse never changes results.
"""
from __future__ import annotations

import torch


def _storage_refs(t: torch.Tensor) -> int | None:
    """References to t's storage (tensors, views, numpy arrays of it); None if torch can't say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return use_count(t.untyped_storage()._cdata)


class BufferPool:
    """Hands out tensors of a given shape/dtype, reusing those the caller has released."""

    def __init__(self, max_buffers: int = 2):
        self.max_buffers = max_buffers  # per shape: the batch the consumer holds + the next one
        self._free_refs: dict[tuple, int] = {}  # refs a buffer has when only the pool holds it
        self._buffers: dict[tuple, list[torch.Tensor]] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        key = (tuple(shape), dtype, str(device))
        pool = self._buffers.setdefault(key, [])
        for buf in pool:
            if _storage_refs(buf) == self._free_refs[key]:
                return buf.view(shape)  # a view holds a reference: the buffer is busy while it lives
        buf = torch.empty(shape, dtype=dtype, device=device)
        refs = _storage_refs(buf)
        if refs is not None and len(pool) < self.max_buffers:
            self._free_refs[key] = refs
            pool.append(buf)
            return buf.view(shape)
        return buf
