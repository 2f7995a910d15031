"""`facesense pack` never loses a user's files, and odd input gets a one-line error (issue 11).

Each test here reproduces a case that destroyed data, hung, or printed a traceback before.
"""
from __future__ import annotations

import errno
import gzip
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_nothing_written, class_image, csv_rows, one_line, png_tree, write_fer_csv
from facesense.cli import app
from pipeline.errors import PackError
from pipeline.pack import PackOptions, pack
from pipeline.shards import read_split, verify

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    line = one_line(result.stderr)
    assert line.startswith("error: ") and len(line) < 400, line
    return line


def small_tree(root: Path):
    return png_tree(root, {"angry": 2, "happy": 2}, prefix="Training_")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- what --out may hold

def test_out_with_someone_elses_manifest_and_files_is_refused_even_with_force(tmp_path):
    src = small_tree(tmp_path / "fer").root
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    (project / "manifest.json").write_text('{"name": "my web app", "version": 3}')
    (project / "thesis.txt").write_text("four years of work")
    (project / "notes" / "n1.md").write_text("notes")
    before = snapshot(project)
    for extra in ([], ["--force"]):
        line = error_line(cli("pack", src, "--out", project, "--workers", "1", *extra))
        assert str(project) in line and "not a FaceSense shard directory" in line
    assert snapshot(project) == before


def test_a_shard_dir_with_a_foreign_file_is_refused_and_the_file_kept(tmp_path):
    src = small_tree(tmp_path / "fer").root
    out = tmp_path / "shards"
    pack(src, out, workers=1, show_progress=False)
    (out / "thesis.txt").write_text("mine")
    line = error_line(cli("pack", src, "--out", out, "--workers", "1", "--force"))
    assert "thesis.txt" in line and "did not write" in line
    assert (out / "thesis.txt").read_text() == "mine" and verify(out) == 4


def test_force_rebuild_removes_only_the_old_packs_own_files(tmp_path, monkeypatch):
    src = small_tree(tmp_path / "fer").root
    out = tmp_path / "shards"
    pack(src, out, PackOptions(shard_size=1), workers=1, show_progress=False)  # train-0..3.h5
    assert (out / "train-3.h5").exists()
    _, built = pack(src, out, PackOptions(shard_size=8), workers=1, force=True, show_progress=False)
    assert built and sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-0.h5"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_source_inside_the_out_dir_is_refused_and_kept(tmp_path):
    out = tmp_path / "shards"
    src = small_tree(out / "fer").root  # images kept inside an old shard directory
    pack(src, tmp_path / "elsewhere", workers=1, show_progress=False)
    before = snapshot(out)
    line = error_line(cli("pack", src, "--out", out, "--workers", "1", "--force"))
    assert "contains the source" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_equal_to_or_inside_the_source_is_refused(tmp_path, where):
    src = small_tree(tmp_path / "fer").root
    out = src if where == "same" else src / "shards"
    before = snapshot(src)
    line = error_line(cli("pack", src, "--out", out, "--workers", "1"))
    assert ("contains the source" if where == "same" else "inside the source") in line
    assert snapshot(src) == before and not (src / "shards").exists()


def test_out_that_is_a_regular_file_is_a_clear_error(tmp_path):
    src = small_tree(tmp_path / "fer").root
    out = tmp_path / "shards"
    out.write_text("x")
    assert "is a file, not a directory" in error_line(cli("pack", src, "--out", out, "--workers", "1"))
    assert out.read_text() == "x"


def test_output_directory_follows_the_umask(tmp_path):
    src = small_tree(tmp_path / "fer").root
    old = os.umask(0o022)
    try:
        pack(src, tmp_path / "shards", workers=1, show_progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shards").stat().st_mode) == 0o755


def test_negative_seed_is_a_clear_error(tmp_path):
    src = small_tree(tmp_path / "fer").root
    line = error_line(cli("pack", src, "--out", tmp_path / "out", "--seed", "-1"))
    assert "--seed -1" in line
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Can't write data (file write failed: time = Mon, filename = 'x.h5', errno = 28, "
                 "error message = 'No space left on device')"),  # as HDF5 words it
], ids=["oserror", "hdf5-message"])
def test_disk_full_while_writing_shards_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, exc):
    import pipeline.pack as pack_module

    src = small_tree(tmp_path / "fer").root

    def full(*args, **kwargs):
        raise exc

    monkeypatch.setattr(pack_module, "write_shard", full)
    out = tmp_path / "deep" / "shards"
    line = error_line(cli("pack", src, "--out", out, "--workers", "1"))
    assert "no space left on device" in line and "nothing was written" in line
    assert not (tmp_path / "deep").exists()


# ----------------------------------------------------------------------------- odd source files

def test_16_bit_png_is_scaled_to_8_bit_not_clipped(tmp_path):
    tree = small_tree(tmp_path / "fer")
    wide = (np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)  # 0..64484
    rel = "train/happy/Training_99.png"
    Image.fromarray(wide).save(tree.root / rel)
    assert Image.open(tree.root / rel).mode.startswith("I;16")
    pack(tree.root, tmp_path / "out", workers=1, show_progress=False)
    data = read_split(tmp_path / "out", "train", with_ids=True)
    got = data.images[data.ids.index(rel)]
    np.testing.assert_array_equal(got, np.round(wide / 257).astype(np.uint8))


def run_pack_cli(*args, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "facesense", "pack", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_fifo_named_like_an_image_is_refused_by_name_not_waited_on(tmp_path):
    src = small_tree(tmp_path / "fer").root
    os.mkfifo(src / "train" / "happy" / "Training_50.png")
    proc = run_pack_cli(src, "--out", tmp_path / "out", "--workers", "2")  # hung forever before
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "Training_50.png" in line and "FIFO" in line
    proc = run_pack_cli(src, "--out", tmp_path / "out", "--workers", "2", "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["source"] for s in manifest["skipped"]] == ["train/happy/Training_50.png"]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 4


def test_a_symlink_loop_is_a_one_line_error_and_skip_bad_skips_it(tmp_path):
    src = small_tree(tmp_path / "fer").root
    loop = src / "train" / "angry" / "Training_60.png"
    os.symlink(loop.name, loop)
    line = error_line(cli("pack", src, "--out", tmp_path / "out", "--workers", "1"))
    assert "Training_60.png" in line and "symbolic links" in line
    manifest, _ = pack(src, tmp_path / "out", PackOptions(skip_bad=True), workers=1, show_progress=False)
    assert [s["source"] for s in manifest["skipped"]] == ["train/angry/Training_60.png"]


def test_a_symlink_loop_as_class_folder_is_a_one_line_error(tmp_path):
    src = small_tree(tmp_path / "fer").root
    os.symlink("sad", src / "train" / "sad")
    line = error_line(cli("pack", src, "--out", tmp_path / "out", "--workers", "1"))
    assert "train/sad" in line and "symbolic links" in line


def png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG file declaring a huge image (a decompression bomb as Pillow sees it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [100_000, 5_000])  # above Pillow's bomb error; below its warning, above ours
def test_decompression_bomb_is_a_bad_item_that_skip_bad_skips(tmp_path, side):
    src = small_tree(tmp_path / "fer").root
    png_header_only(src / "train" / "happy" / "Training_70.png", side, side)
    line = error_line(cli("pack", src, "--out", tmp_path / "out", "--workers", "1", "--resize"))
    assert "Training_70.png" in line and ("larger than" in line or "too large" in line)
    manifest, _ = pack(src, tmp_path / "out", PackOptions(skip_bad=True, resize=True), workers=1,
                       show_progress=False)
    assert [s["source"] for s in manifest["skipped"]] == ["train/happy/Training_70.png"]


# ----------------------------------------------------------------------------- CSV variants

def csv_bytes(tmp_path) -> tuple[bytes, list]:
    rows = csv_rows({"train": 7, "val": 7, "test": 0})
    return write_fer_csv(tmp_path / "plain.csv", rows).read_bytes(), rows


def packed_images(out: Path) -> np.ndarray:
    return np.concatenate([read_split(out, s).images for s in ("train", "val")])


@pytest.mark.parametrize("variant", ["bom", "crlf-bom", "cr-only", "gzip", "tar.gz"])
def test_csv_variants_pack_like_the_plain_file(tmp_path, variant):
    plain, _ = csv_bytes(tmp_path)
    pack(tmp_path / "plain.csv", tmp_path / "want", workers=1, show_progress=False)
    if variant == "bom":
        path, data = tmp_path / "fer2013.csv", b"\xef\xbb\xbf" + plain
    elif variant == "crlf-bom":
        path, data = tmp_path / "fer2013.csv", b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n")
    elif variant == "cr-only":
        path, data = tmp_path / "fer2013.csv", plain.replace(b"\n", b"\r")
    elif variant == "gzip":
        path, data = tmp_path / "fer2013.csv.gz", gzip.compress(plain)
    else:  # Kaggle's original download: fer2013/fer2013.csv (+ README) in a tar.gz
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, content in (("fer2013/README", b"read me"), ("fer2013/fer2013.csv", plain)):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        path, data = tmp_path / "fer2013.tar.gz", buf.getvalue()
    path.write_bytes(data)
    result = cli("pack", path, "--out", tmp_path / "got", "--workers", "1")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(packed_images(tmp_path / "got"), packed_images(tmp_path / "want"))


def test_a_cr_only_file_with_a_bad_header_is_not_echoed_whole(tmp_path):
    rows = [(0, "Training", class_image(0, f"r{i}")) for i in range(200)]
    data = write_fer_csv(tmp_path / "x.csv", rows).read_bytes().replace(b"emotion", b"emo", 1)
    (tmp_path / "x.csv").write_bytes(data.replace(b"\n", b"\r"))
    line = error_line(cli("pack", tmp_path / "x.csv", "--out", tmp_path / "out"))
    assert "missing column(s) emotion" in line


def test_binary_junk_and_long_fields_are_cut_in_the_error(tmp_path):
    (tmp_path / "junk.csv").write_bytes(bytes(range(256)) * 4000)
    line = error_line(cli("pack", tmp_path / "junk.csv", "--out", tmp_path / "out"))
    assert "binary file" in line
    rows = [(0, "Training", class_image(0, "a")), (0, "X" * 100_000, class_image(0, "b"))]
    write_fer_csv(tmp_path / "long.csv", rows)
    line = error_line(cli("pack", tmp_path / "long.csv", "--out", tmp_path / "out"))
    assert "line 3" in line and "unknown Usage" in line


def test_a_corrupt_gzip_is_a_clear_error(tmp_path):
    plain, _ = csv_bytes(tmp_path)
    (tmp_path / "fer2013.csv.gz").write_bytes(gzip.compress(plain)[:200])
    line = error_line(cli("pack", tmp_path / "fer2013.csv.gz", "--out", tmp_path / "out"))
    assert "fer2013.csv.gz" in line and "corrupt" in line
    with pytest.raises(PackError):
        pack(tmp_path / "fer2013.csv.gz", tmp_path / "out", show_progress=False)
