"""The GPU check's smoke mode: the same script a GPU run uses, on CPU with tiny sizes, so it cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from train_helpers import ROOT, child_env, make_shards

PARTS = gpu_check.PARTS  # one list: benchmarks/gpu_parts.PARTS, in running order


def test_the_check_runs_the_five_documented_parts_in_order():
    assert PARTS == ("tests", "augment", "loader", "train", "accuracy")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    data = make_shards(root / "shards")
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--data", str(data), "--out", str(out),
                           "--smoke", "--budget-s", "600"], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=900)
    return data, out, proc


def test_smoke_run_writes_the_promised_files(smoke):
    data, out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.md", "gpu.json", "tests.log", "best.pt", "metrics.jsonl", "report.json"])
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)


def test_smoke_gpu_json_has_every_part_with_a_status(smoke):
    _, out, _ = smoke
    report = json.loads((out / "gpu.json").read_text())
    assert set(PARTS) | {"env"} <= set(report)
    assert torch.__version__.startswith(report["env"]["versions"]["torch"]) and report["env"]["git_commit"]
    for part in PARTS:
        assert report[part]["status"] == "ok", (part, report[part])
    assert report["tests"]["counts"]["passed"] > 0
    assert any("triton skipped" in note for note in report["augment"]["notes"])  # CUDA-only: said, not hidden
    assert {r["loader"] for r in report["train"]["results"] if r["mode"] == "end_to_end"} >= {"resident",
                                                                                            "dataloader"}
    acc = report["accuracy"]
    assert acc["epochs_done"] >= 1 and 0 <= acc["val"]["accuracy"] <= 1 and acc["test"] is not None
    assert acc["fp16_agrees"] is True


def test_smoke_outputs_are_usable(smoke):
    data, out, _ = smoke
    from facesense.core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "best.pt")
    weights = ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"]
    assert all(v.dtype in (torch.float16, torch.int64) for v in weights.values())  # fp16 storage
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and report["count"] == 21  # test exists in these shards
    summary = (out / "summary.md").read_text()
    for part in PARTS:
        assert f"| {part} | ok |" in summary


def test_a_failing_or_hanging_part_is_reported_not_fatal(tmp_path):
    settings = {"data": str(tmp_path), "smoke": True}
    broken = gpu_check.run_part("accuracy", settings, tmp_path, box_s=120)  # no shards there: it raises
    assert broken["status"] == "failed" and broken["error"].startswith("exit code")
    hung = gpu_check.run_part("tests", settings, tmp_path, box_s=0.5)  # pytest cannot finish in half a second
    assert hung["status"] == "failed" and "timed out" in hung["error"]


def test_missing_data_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "out"), "--smoke"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "pack the data first" in proc.stderr
