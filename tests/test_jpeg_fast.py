"""The fast JPEG path of pack (pipeline/jpeg_fast.py) against Image.open, bit for bit."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import folders, jpeg_fast
from pipeline.pack import PackOptions, pack
from pipeline.shards import read_split

pytestmark = pytest.mark.skipif(not jpeg_fast.AVAILABLE, reason="this Pillow lacks the decoder internals")


def jpeg_bytes(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", **save)
    return buf.getvalue()


def pil_gray(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"))


def faces(n: int, side: int = 48, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: JPEG-like content with real DCT work in every block."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    base = (yy * rng.uniform(0, 4, (n, 1, 1)) + xx * rng.uniform(0, 4, (n, 1, 1)))
    return np.clip(base + rng.normal(0, 20, (n, side, side)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("save", [{"quality": 95}, {"quality": 30}, {"progressive": True},
                                  {"quality": 75, "optimize": True}])
def test_fast_decode_equals_image_open(save):
    images = faces(6)
    blobs = [jpeg_bytes(a, **save) for a in images]
    band = jpeg_fast.GrayBand(len(blobs), 48)
    assert all(band.decode(k, b) for k, b in enumerate(blobs))
    got = band.array()
    for k, blob in enumerate(blobs):
        np.testing.assert_array_equal(got[k], pil_gray(blob))


def test_files_the_fast_path_must_leave_to_image_open():
    gray = faces(1)[0]
    good = jpeg_bytes(gray)
    png = io.BytesIO()
    Image.fromarray(gray).save(png, "PNG")
    declined = {
        "colour": jpeg_bytes(np.stack([gray, gray[::-1], gray.T], -1)),
        "other size": jpeg_bytes(faces(1, side=64)[0]),
        "png": png.getvalue(),
        "truncated": good[:len(good) // 2],
        "empty": b"",
        "not an image": b"hello",
    }
    band = jpeg_fast.GrayBand(1, 48)
    for what, data in declined.items():
        assert band.decode(0, data) is False, what
    assert band.decode(0, good) is True


def test_damaged_scan_data_decodes_as_image_open_does():
    """libjpeg tolerates garbage inside the entropy-coded data (with a warning): so does
    Image.open, and the fast path must give the very same pixels."""
    good = jpeg_bytes(faces(1)[0])
    damaged = good[:-200] + bytes(range(198)) + b"\xff\xd9"
    band = jpeg_fast.GrayBand(1, 48)
    assert band.decode(0, damaged)
    np.testing.assert_array_equal(band.array()[0], pil_gray(damaged))


def test_jpeg_frame_reads_the_header():
    data = jpeg_bytes(faces(1, side=64)[0][:40])  # 40 rows, 64 columns
    assert jpeg_fast.jpeg_frame(data) == (8, 40, 64, 1)
    assert jpeg_fast.jpeg_frame(b"\xff\xd8\xff") is None


def test_read_file_reads_files_larger_than_one_read(tmp_path):
    path = tmp_path / "big.bin"
    payload = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    path.write_bytes(payload)
    data, stat = jpeg_fast.read_file(str(path))
    assert data == payload and stat.st_size == len(payload)
    exact = tmp_path / "exact.bin"  # exactly one read's worth: the loop must still stop
    exact.write_bytes(payload[:1 << 16])
    assert jpeg_fast.read_file(str(exact))[0] == payload[:1 << 16]


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_of_jpegs_holds_what_image_open_decodes(tmp_path, monkeypatch, workers):
    """Fast-path JPEGs, a colour JPEG and PNGs side by side: every image as Image.open sees it.
    Chunks of 8 files, so two workers share the decode (and its fingerprint) for real."""
    monkeypatch.setattr(folders, "CHUNK", 8)
    expected = {}
    for k, array in enumerate(faces(40, seed=1)):
        rel = f"train/happy/Training_{k}.jpg"
        (tmp_path / "src" / "train" / "happy").mkdir(parents=True, exist_ok=True)
        if k % 10 == 3:  # a colour JPEG: converted to gray by Image.open
            data = jpeg_bytes(np.stack([array, array[::-1], array.T], -1))
        elif k % 10 == 7:
            rel = rel[:-4] + ".png"
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, "PNG")
            data = buf.getvalue()
        else:
            data = jpeg_bytes(array, quality=90)
        (tmp_path / "src" / rel).write_bytes(data)
        expected[rel] = pil_gray(data)
    def run():
        return pack(tmp_path / "src", tmp_path / "out", PackOptions(val_fraction=0.25),
                    workers=workers, show_progress=False)

    _, built = run()
    assert built
    assert run()[1] is False  # the workers' fingerprint equals the stat pass of an unchanged source
    seen = {}
    for split in ("train", "val"):
        part = read_split(tmp_path / "out", split, with_ids=True)
        seen.update(zip(part.ids, part.images))
    assert seen.keys() == expected.keys()
    for rel, image in expected.items():
        np.testing.assert_array_equal(seen[rel], image, err_msg=rel)
