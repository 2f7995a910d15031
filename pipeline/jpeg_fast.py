"""Decode many small gray JPEGs with Pillow's libjpeg decoder, without Image.open.

For a 48x48 FER2013 JPEG, `Image.open` spends more time in Python than libjpeg
spends on the pixels: format probing, header parsing into a dict, an Image object
and then a numpy copy per file (figures in benchmarks/RESULTS.md, Pack). Here a
chunk of files is decoded into one tall Pillow image (a 48-row band per file) and
converted to numpy once, after a minimal header check of our own.

This uses three Pillow internals (`Image._getdecoder`, `Image.core.new`,
`Image.Image()._new`) that Pillow's own ImageFile.load is built on. Anything the
check does not accept (PNG, colour, other sizes, 12-bit, arithmetic coding,
corrupt or truncated data) returns False and the caller uses the plain
`Image.open` path, so odd files get the same result and error as before, and a
Pillow without these internals only loses speed. tests/test_jpeg_fast.py holds
the fast path to `Image.open(...).convert("L")` bit for bit.
"""
from __future__ import annotations

import os
import stat

import numpy as np

try:
    from PIL import Image

    AVAILABLE = all(hasattr(x, name) for x, name in
                    ((Image, "_getdecoder"), (Image.core, "new"), (Image.Image, "_new")))
except ImportError:  # pragma: no cover - Pillow is a dependency
    AVAILABLE = False

# Start-of-frame markers libjpeg-turbo decodes with Huffman coding: baseline,
# extended sequential, progressive (arithmetic-coded SOF9+ go the plain way).
_SOF_HUFFMAN = (0xC0, 0xC1, 0xC2)


class NotRegularFile(OSError):
    """A FIFO, socket or device where an image file was expected (reading it could wait forever)."""


def read_file(path: str) -> tuple[bytes, os.stat_result]:
    """The whole file and its stat, with fewer Python objects (so less time) than open().read()."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path}: not a regular file")
        data = os.read(fd, 1 << 16)
        if len(data) < 1 << 16:  # a short read of a regular file is its end
            return data, st
        parts = [data]
        while len(parts[-1]) == 1 << 16:
            parts.append(os.read(fd, 1 << 16))
        return b"".join(parts), st
    finally:
        os.close(fd)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from the start-of-frame marker, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 10 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _SOF_HUFFMAN:
            return (data[i + 4], (data[i + 5] << 8) | data[i + 6],
                    (data[i + 7] << 8) | data[i + 8], data[i + 9])
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another frame type, or scan data before any frame header
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


class GrayBand:
    """Decodes up to n side x side 8-bit gray JPEGs into rows of one (n, side, side) array."""

    def __init__(self, n: int, side: int):
        self.n, self.side = n, side
        self._image = Image.core.new("L", (side, side * n))

    def decode(self, k: int, data: bytes) -> bool:
        """Decode data into row k; False (row untouched or partial) if this path can't."""
        if jpeg_frame(data) != (8, self.side, self.side, 1):
            return False
        try:
            decoder = Image._getdecoder("L", "jpeg", ("L", ""))
            decoder.setimage(self._image, (0, self.side * k, self.side, self.side * (k + 1)))
            consumed, error = decoder.decode(data)
            decoder.cleanup()
        except Exception:  # noqa: BLE001 - anything odd: let Image.open decide and report
            return False
        return consumed < 0 and error >= 0  # finished, no error (else truncated or corrupt)

    def array(self) -> np.ndarray:
        raw = Image.Image()._new(self._image).tobytes()
        return np.frombuffer(raw, np.uint8).reshape(self.n, self.side, self.side)
