"""`facesense pack` / `facesense verify` from the command line: exit codes, messages, interrupts."""
from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import (assert_nothing_written, class_image, csv_rows, one_line, partials_beside, png_tree,
                      save_image, write_fer_csv, write_ferplus)
from facesense.cli import app
from pipeline.pack import PackOptions, pack
from pipeline.shards import verify

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    """The CLI's error: exactly one line on stderr, starting with 'error:'."""
    assert result.exit_code != 0
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("error: ")
    return line


def test_pack_verify_up_to_date_and_force(kaggle, tmp_path):
    out = tmp_path / "out"
    result = cli("pack", kaggle.root, "--out", out, "--workers", "1", "--shard-size", "10")
    assert result.exit_code == 0, result.output
    msg = one_line(result.stdout)
    assert msg.startswith(f"packed {out}:") and "train 28, val 14, test 14" in msg and "7 classes" in msg
    assert verify(out) == 56

    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    inode = out.stat().st_ino
    result = cli("pack", kaggle.root, "--out", out, "--workers", "1", "--shard-size", "10")
    assert result.exit_code == 0
    assert "up to date" in one_line(result.stdout) and "--force" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

    result = cli("pack", kaggle.root, "--out", out, "--workers", "1", "--shard-size", "10", "--force")
    assert result.exit_code == 0
    assert one_line(result.stdout).startswith(f"packed {out}:")
    assert {p.name for p in out.iterdir()} == set(stamp)
    assert out.stat().st_ino != inode  # a freshly built directory was swapped in

    result = cli("verify", out)
    assert result.exit_code == 0
    assert one_line(result.stdout) == f"{out}: OK (56 images)"


def test_verify_names_a_corrupt_shard_and_exits_non_zero(kaggle, tmp_path):
    out = tmp_path / "out"
    assert cli("pack", kaggle.root, "--out", out, "--workers", "1", "--shard-size", "10").exit_code == 0
    target = out / "train-1.h5"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    line = error_line(cli("verify", out))
    assert str(target) in line


def test_verify_of_a_missing_directory_explains(tmp_path):
    line = error_line(cli("verify", tmp_path / "nothing"))
    assert "manifest.json" in line and "facesense pack" in line


def _bad_folder(root):
    save_image(root / "train/happy/Training_bad.png", class_image(3, "x", side=50))
    return str(root / "train/happy/Training_bad.png")


def _corrupt_folder(root):
    (root / "test/sad").mkdir(parents=True, exist_ok=True)
    (root / "test/sad/PublicTest_bad.jpg").write_bytes(b"\xff\xd8garbage")
    return str(root / "test/sad/PublicTest_bad.jpg")


def _unknown_class(root):
    save_image(root / "train/Joy/Training_j.png", class_image(3, "j"))
    return "Joy"


@pytest.mark.parametrize("make_bad", [_bad_folder, _corrupt_folder, _unknown_class])
def test_pack_bad_folder_input_one_line_error_nothing_written(kaggle, tmp_path, make_bad):
    needle = make_bad(kaggle.root)
    out = tmp_path / "out"
    line = error_line(cli("pack", kaggle.root, "--out", out, "--workers", "1"))
    assert needle in line
    assert_nothing_written(out)


def test_pack_skip_bad_reports_the_count(kaggle, tmp_path):
    _bad_folder(kaggle.root)
    _corrupt_folder(kaggle.root)
    out = tmp_path / "out"
    result = cli("pack", kaggle.root, "--out", out, "--workers", "1", "--skip-bad")
    assert result.exit_code == 0
    assert "skipped 2 bad items" in one_line(result.stdout)


def test_pack_resize_flag(kaggle, tmp_path):
    _bad_folder(kaggle.root)
    out = tmp_path / "out"
    assert cli("pack", kaggle.root, "--out", out, "--workers", "1").exit_code != 0
    result = cli("pack", kaggle.root, "--out", out, "--workers", "1", "--resize")
    assert result.exit_code == 0, result.output
    assert "train 29" in result.stdout


def test_pack_bad_csv_row_names_the_line(tmp_path):
    rows = csv_rows({"train": 4, "val": 2})
    rows[3] = (0, "Training", " ".join(["256"] * 2304))
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    out = tmp_path / "out"
    line = error_line(cli("pack", path, "--out", out))
    assert "fer2013.csv line 5:" in line and "out of range" in line
    assert_nothing_written(out)


def test_pack_csv_and_ferplus_from_the_cli(tmp_path):
    rows = csv_rows({"train": 4, "val": 2, "test": 2})
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    plus_rows = [(u, f"fer{k}.png", [0, 8, 2, 0, 0, 0, 0, 0, 0, 0]) for k, (_, u, _) in enumerate(rows)]
    plus = write_ferplus(tmp_path / "fer2013new.csv", plus_rows)
    out = tmp_path / "out"
    result = cli("pack", path, "--out", out, "--ferplus", plus)
    assert result.exit_code == 0, result.output
    assert "8 classes" in result.stdout and "train 4, val 2, test 2" in result.stdout
    assert cli("verify", out).exit_code == 0

    short = write_ferplus(tmp_path / "short.csv", plus_rows[:-1])
    line = error_line(cli("pack", path, "--out", tmp_path / "out2", "--ferplus", short))
    assert str(short) in line and "7 rows" in line
    assert_nothing_written(tmp_path / "out2")

    line = error_line(cli("pack", path, "--out", tmp_path / "out3", "--ferplus", tmp_path / "absent.csv"))
    assert "absent.csv" in line
    assert_nothing_written(tmp_path / "out3")


@pytest.mark.parametrize("args, needle", [
    (["--format", "xml"], "--format"),
    (["--val-fraction", "0"], "--val-fraction"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--shard-size", "0"], "--shard-size"),
])
def test_pack_bad_options(kaggle, tmp_path, args, needle):
    out = tmp_path / "out"
    line = error_line(cli("pack", kaggle.root, "--out", out, "--workers", "1", *args))
    assert needle in line
    assert_nothing_written(out)


def test_pack_missing_source(tmp_path):
    line = error_line(cli("pack", tmp_path / "nowhere", "--out", tmp_path / "out"))
    assert str(tmp_path / "nowhere") in line
    assert_nothing_written(tmp_path / "out")


def test_unknown_option_is_not_ignored(kaggle, tmp_path):
    result = runner.invoke(app, ["pack", str(kaggle.root), "--out", str(tmp_path / "out"), "--shuffle"])
    assert result.exit_code == 2
    assert_nothing_written(tmp_path / "out")


def test_module_entry_point_runs(tmp_path):
    """`python -m facesense` is the same CLI (used by the interrupt tests below)."""
    path = write_fer_csv(tmp_path / "fer2013.csv", csv_rows({"train": 3}))
    proc = subprocess.run([sys.executable, "-m", "facesense", "pack", str(path), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"packed {tmp_path / 'o'}: train 3, val 0, test 0")


# ----------------------------------------------------------------------------- interrupts

# A pack that stops at a known point and waits there for the test's signal: no timing, no polling.
# It runs `facesense` with forkpool.ordered_map wrapped: in its Nth use (1: decoding, 2: writing
# shards) the parent, after taking the first result and with any worker pool still running, says
# "paused" on stdout and blocks until a signal arrives. The wakeup fd makes that wait race-free
# whichever thread the kernel hands the signal to (the pool's threads do not block it); the
# policy's own handler then raises in the main thread, exactly as for a signal at any other time.
PAUSED_PACK = """
import os, signal, sys
from contextlib import contextmanager
from pipeline import forkpool
from facesense.cli import main

pause_in = int(sys.argv.pop(1))
real_map, uses = forkpool.ordered_map, []

def pause():
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    print("paused", flush=True)
    os.read(wake_r, 1)  # raises here if the signal lands on this thread
    for _ in range(10_000_000):  # else the handler runs at the first check point of this loop
        pass
    sys.exit("paused pack: no handler raised")

def pause_after_first(results):
    results = iter(results)
    yield next(results)
    pause()
    yield from results

@contextmanager
def ordered_map(fn, tasks, workers):
    uses.append(fn)
    with real_map(fn, tasks, workers) as results:
        yield pause_after_first(results) if len(uses) == pause_in else results

forkpool.ordered_map = ordered_map
sys.argv[0] = "facesense"
main()
"""
PAUSE_IN = {"partial": 1, "shard": 2}  # decoding (the partial dir exists), writing shards (it holds one)


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """Tiny JPEGs in more than one decode chunk, so that the pack can pause between chunks."""
    from pipeline.folders import CHUNK

    root = tmp_path_factory.mktemp("big") / "src"
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(32):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    for c, cls in enumerate(("angry", "happy", "sad")):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(CHUNK // 2 + 1):  # 3 classes: 2 chunks
            (root / "train" / cls / f"Training_{c}_{i}.jpg").write_bytes(blobs[(i + c) % 32])
    return root


def start_pack(src: Path, out: Path, workers: int, when: str) -> subprocess.Popen:
    """`facesense pack` that pauses at `when` (see PAUSED_PACK)."""
    return subprocess.Popen(
        [sys.executable, "-c", PAUSED_PACK, str(PAUSE_IN[when]), "pack", str(src), "--out", str(out),
         "--workers", str(workers), "--shard-size", "64"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, out: Path, what: str, hang_guard: float = 120) -> Path:
    """Block until the pack says it is paused, then return its partial dir (holding a shard for 'shard')."""
    ready, _, _ = select.select([proc.stdout], [], [], hang_guard)  # a guard against a hang, not a timing
    if not ready:
        proc.kill()
        pytest.fail(f"the pack did not pause within {hang_guard}s")
    line = proc.stdout.readline()
    assert line == "paused\n", f"pack ended before it could be interrupted: {line!r}, {proc.communicate()}"
    assert proc.poll() is None
    partials = partials_beside(out)
    assert len(partials) == 1, partials
    if what == "shard":
        assert any(name.endswith(".h5") for name in os.listdir(partials[0])), os.listdir(partials[0])
    return partials[0]


@pytest.mark.parametrize("sig, workers, when", [
    (signal.SIGTERM, 1, "partial"),   # while decoding
    (signal.SIGINT, 1, "shard"),      # while shards are being written
    (signal.SIGTERM, 2, "partial"),   # with a worker pool to shut down
    (signal.SIGINT, 2, "shard"),      # while a worker pool writes the shards
])
def test_interrupted_pack_leaves_nothing(big_source, tmp_path, sig, workers, when):
    out = tmp_path / "out"
    proc = start_pack(big_source, out, workers, when)
    partial = wait_for(proc, out, when)
    assert partial.name.startswith(f".out.partial-{proc.pid}-")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    assert one_line(stderr) == "error: interrupted; nothing was written"
    assert_nothing_written(out)


def test_killed_pack_leaves_a_partial_that_the_next_pack_removes(big_source, tmp_path):
    out = tmp_path / "out"
    proc = start_pack(big_source, out, 1, "partial")
    partial = wait_for(proc, out, "partial")
    proc.kill()
    proc.wait(timeout=60)
    assert not out.exists()
    assert partial.is_dir()  # SIGKILL leaves no chance to clean up

    small = png_tree(tmp_path / "small", {"happy": 3, "sad": 3}, prefix="Training_")
    _, built = pack(small.root, out, PackOptions(), workers=1, show_progress=False)
    assert built
    assert not partial.exists()
    assert partials_beside(out) == []
    assert verify(out) == 6
