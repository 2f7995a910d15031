"""The GPU check's smoke mode: the same script a GPU run uses, on CPU with tiny sizes, so it cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check, gpu_parts
from train_helpers import ROOT, child_env, make_shards

PARTS = gpu_check.PARTS  # one list: benchmarks/gpu_parts.PARTS, in running order


GPU_ONLY = ("decode", "stream")  # skipped with the reason on a CPU and in a smoke run
CPU_SMOKE = tuple(p for p in PARTS[:-1] if p not in GPU_ONLY)  # the parts a smoke run runs


def test_the_check_runs_the_eight_documented_parts_in_order():
    assert PARTS == ("tests", "augment", "loader", "train", "decode", "stream", "accuracy", "ddp")


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
    for part in CPU_SMOKE:
        assert report[part]["status"] == "ok", (part, report[part])
    for part in GPU_ONLY:
        assert report[part]["status"] == "skipped", (part, report[part])
        assert report[part]["reason"] == "smoke run (CPU): this part measures the GPU only"
    # A CPU run has no GPU to scale over: said, not failed.
    assert report["ddp"] == {"status": "skipped", "reason": "no GPU: DDP scaling needs at least two", "gpus": 0}
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
    for part in CPU_SMOKE:
        assert f"| {part} | ok |" in summary
    for part in GPU_ONLY:
        assert f"| {part} | skipped |" in summary and "this part measures the GPU only" in summary
    assert "| ddp | skipped | - | no GPU: DDP scaling needs at least two |" in summary


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


def test_the_ddp_part_skips_with_fewer_than_two_gpus(tmp_path):
    assert gpu_parts.ddp_skipped(1) == {"status": "skipped", "reason": "one GPU: DDP scaling needs at least two",
                                        "gpus": 1}
    assert gpu_parts.ddp_skipped(2) is None
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs to scale over")
    # Not a smoke run: the part itself counts the GPUs, and records the skip without failing.
    result = gpu_check.run_part("ddp", {"data": str(tmp_path), "smoke": False}, tmp_path, box_s=120)
    assert result["status"] == "skipped" and result["reason"].endswith(": DDP scaling needs at least two")


def test_ddp_is_owed_nothing_when_it_is_skipped():
    left, budget = 300.0, 540.0
    skipped = {**gpu_check.SHARES, "ddp": 0.0}
    assert gpu_check.time_box("accuracy", left, budget, skipped) == left  # all the rest, as without the part
    assert gpu_check.time_box("train", budget, budget, skipped) == pytest.approx(0.22 * budget)
    kept = gpu_check.time_box("accuracy", left, budget, gpu_check.SHARES)
    assert kept == pytest.approx(left - gpu_check.SHARES["ddp"] * budget)
    assert gpu_check.time_box("ddp", left - kept, budget, gpu_check.SHARES) == pytest.approx(left - kept)


def test_ddp_scaling_launches_torchrun_on_one_and_on_n_processes(tmp_path):
    # The part's path on a CPU (gloo): two launches, one process and two, of the real synthetic step.
    step = {"model": gpu_parts.TINY_MODEL, "variant": "eager-fp32-cl", "channels": 1, "batch_size": 4, "steps": 1,
            "warmup": 1, "repeats": 2}
    settings = {"scratch": str(tmp_path), "deadline_s": 300, "result": str(tmp_path / "result.json")}
    result = gpu_parts.ddp_scaling(settings, 2, "cpu", [32], step)
    assert result["status"] == "ok", result.get("error")
    one, two = result["results"]
    assert (one["gpus"], one["ddp"], two["gpus"], two["ddp"]) == (1, False, 2, True)
    assert all(r["size"] == 32 and len(r["all_images_per_s"]) == 2 and r["images_per_s"] > 0 for r in (one, two))
    assert two["images_per_s_per_gpu"] == pytest.approx(two["images_per_s"] / 2)
    assert result["scaling_efficiency"] == {"32": pytest.approx(two["images_per_s"] / (2 * one["images_per_s"]))}
    assert json.loads((tmp_path / "result.json").read_text())["partial"] is True  # kept as it went


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the parts measure")
@pytest.mark.parametrize("part", GPU_ONLY)
def test_gpu_only_parts_skip_cleanly_without_cuda(tmp_path, part):
    # Not a smoke run: the part itself finds no CUDA device and says so, without failing or measuring.
    result = gpu_check.run_part(part, {"data": str(tmp_path), "smoke": False}, tmp_path, box_s=120)
    assert result["status"] == "skipped", result
    assert result["reason"] == "no CUDA device: this part measures the GPU only"


def test_gpu_only_parts_measure_on_a_cpu_when_asked(tmp_path):
    # The parts' measurements, on a CPU with CPU decoders and a tiny model, so their code cannot rot
    # on machines without a GPU (the parts themselves call them with cuda).
    data = make_shards(tmp_path / "shards")
    settings = {"data": str(data), "scratch": str(tmp_path / "scratch"), "result": str(tmp_path / "result.json")}
    decoded = gpu_parts.gpu_decode(settings, torch.device("cpu"), 32, 40, ["pillow_pool", "nvjpeg", "dali_mixed"], 16, 1)
    rows = {r["decoder"]: r for r in decoded["results"]}
    assert decoded["status"] == "ok" and rows["pillow_pool"]["images_per_s"] > 0
    assert rows["nvjpeg"]["skipped"] == "no CUDA device: GPU decode needs a GPU" and rows["dali_mixed"]["skipped"]
    step = {"model": gpu_parts.TINY_MODEL, "variant": "eager-fp32-cl", "channels": 3, "batch_size": 8, "steps": 1,
            "warmup": 1, "repeats": 1}
    (tmp_path / "scratch").mkdir()
    streamed = gpu_parts.encoded_end_to_end(settings, torch.device("cpu"), [32], 60, step)
    assert streamed["status"] == "ok" and set(streamed["end_to_end_over_ceiling"]["32"]) == {"stream", "auto"}
    assert streamed["targets"]["32"]["stream"]["target"] == 0.97
    assert "streaming" in streamed["describe"]["32"]["stream"] and "resident" in streamed["describe"]["32"]["auto"]
    summary = gpu_check.summary_markdown({"env": {"versions": {}, "machine": {}}, "smoke": False, "budget_s": 540,
                                          "total_s": 1, "decode": decoded, "stream": streamed})
    assert "| decode 32 px JPEGs, pillow_pool (img/s) |" in summary
    assert "| encoded shards end to end / ceiling, 32 px (stream) |" in summary
