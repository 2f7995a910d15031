"""Encoded image bytes -> uint8 pixels: the one decode rule that pack, the loaders and tests share.

Pillow decodes; gray is ITU-R 601 luma (Pillow's "L", what pack has always stored), colour is
RGB. 16-bit gray is scaled 65535 -> 255 (Pillow's convert("L") clips it, which turns a 16-bit
PNG almost white). A resize, where asked for, is bilinear with Pillow's defaults.

`DecodePool` decodes a batch on threads: Pillow releases the GIL while its C decoder runs,
so threads scale without pickling pixels between processes.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Larger images are refused before decoding (decompression bombs).
MAX_PIXELS = 8192 * 8192


class DecodeError(ValueError):
    """A file that is not a usable image; the message is the reason, for a one-line error."""


def _as_bytes(blob) -> bytes | memoryview:
    return memoryview(blob) if isinstance(blob, np.ndarray) else blob


def open_image(blob):
    """A Pillow image from file bytes, its header checked (size) before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(_as_bytes(blob)))
    except Image.DecompressionBombError as exc:  # not an OSError
        raise DecodeError(f"image too large ({str(exc).splitlines()[0][:80]})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DecodeError(f"unreadable or corrupt image ({str(exc).splitlines()[0][:80]})") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise DecodeError(f"image is {width}x{height}, larger than {MAX_PIXELS:,} pixels")
    return img


def image_channels(img) -> int:
    """3 for colour modes, 1 for gray ones (alpha and palette follow their colour)."""
    if img.mode == "P":
        return 3 if "RGB" in img.palette.mode else 1
    return 1 if img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16") else 3


def convert(img, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded Pillow image -> (H, W) gray or (H, W, 3) RGB uint8, resized to size=(H, W) if given."""
    from PIL import Image

    try:
        if img.mode.startswith("I;16"):
            wide = np.asarray(img).astype(np.uint32)
            img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
        elif img.mode in ("I", "F"):
            raise DecodeError("32-bit integer or float image; save it as 8-bit gray or colour")
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(img)
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large ({str(exc).splitlines()[0][:80]})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"unreadable or corrupt image ({str(exc).splitlines()[0][:80]})") from None


def decode_image(blob, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """File bytes -> (H, W) uint8 when channels == 1, (H, W, 3) RGB when 3; DecodeError if unusable."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with open_image(blob) as img:
        return convert(img, channels, size)


def probe(blob) -> tuple[int, int, int]:
    """(height, width, channels) of an image from its bytes, decoding it fully (validation)."""
    with open_image(blob) as img:
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise DecodeError(f"unreadable or corrupt image ({str(exc).splitlines()[0][:80]})") from None
        return img.size[1], img.size[0], image_channels(img)


class DecodePool:
    """Decode batches of file bytes on a few threads."""

    def __init__(self, workers: int = 2):
        self.workers = max(1, int(workers))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode") if self.workers > 1 else None

    def decode_batch(self, blobs: list, channels: int, size: tuple[int, int]) -> np.ndarray:
        """(B, H, W) or (B, H, W, 3) uint8 at `size`; images of another size are resized to it."""
        shape = (len(blobs), *size) + ((3,) if channels == 3 else ())
        out = np.empty(shape, np.uint8)

        def one(i: int) -> None:
            out[i] = decode_image(blobs[i], channels, size)

        if self._pool is None or len(blobs) < 2:
            for i in range(len(blobs)):
                one(i)
        else:
            # Contiguous runs per thread: fewer futures than images.
            step = -(-len(blobs) // self.workers)
            runs = [range(s, min(s + step, len(blobs))) for s in range(0, len(blobs), step)]
            for future in [self._pool.submit(lambda r=r: [one(i) for i in r]) for r in runs]:
                future.result()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        self.close()


def decode_side(entry, out_size: int) -> tuple[int, int]:
    """The (H, W) a loader decodes a split to: its common image_shape, else (out_size, out_size).

    `entry`: a manifest split entry (dict) or a SplitArrays (attribute image_shape).
    """
    shape = entry.get("image_shape") if isinstance(entry, dict) else getattr(entry, "image_shape", None)
    return (int(shape[0]), int(shape[1])) if shape else (out_size, out_size)
