"""Benchmark commands run end to end on tiny data and write the JSON keys users rely on, and refuse
options they cannot run with in one line, before running anything.

These check the commands and their result files, never a timing.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from facesense.cli import app
from test_loaders import make_shards


def run_bench(*args: str):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    return result


def test_bench_loader_json(tmp_path):
    shards = make_shards(tmp_path / "shards")
    out = tmp_path / "loader.json"
    run_bench("loader", "--data", str(shards), "--kinds", "resident,dataloader", "--sizes", "48,64",
              "--batches", "2", "--batch-size", "8", "--warmup", "1", "--repeats", "1", "--workers", "1",
              "--json", str(out))
    payload = json.loads(out.read_text())
    rows = {(r["kind"], r["size"]): r for r in payload["results"]}
    assert set(rows) == {("resident", 48), ("resident", 64), ("dataloader", 48), ("dataloader", 64)}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert {"machine", "versions", "git_commit", "config"} <= set(payload)
    assert set(payload["speedup_vs_dataloader"]) == {"48", "64"}


def test_bench_train_json(tmp_path):
    shards = make_shards(tmp_path / "shards")
    out = tmp_path / "train.json"
    run_bench("train", "--data", str(shards), "--sizes", "48", "--model", "test_efficientnet",
              "--variants", "eager-fp32-cl,eager-fp32-nchw", "--loaders", "resident",
              "--batch-size", "8", "--steps", "1", "--warmup", "1", "--repeats", "1", "--json", str(out))
    payload = json.loads(out.read_text())
    modes = [(r["mode"], r["loader"], r["variant"]) for r in payload["results"]]
    assert modes == [("synthetic", "none", "eager-fp32-cl"), ("synthetic", "none", "eager-fp32-nchw"),
                     ("end_to_end", "resident", "eager-fp32-cl")]
    assert all(r["size"] == 48 and r["images_per_s"] > 0 for r in payload["results"])
    assert "resident" in payload["end_to_end_over_ceiling"]["48"]


def test_bench_train_rejects_unknown_variant(tmp_path):
    shards = make_shards(tmp_path / "shards")
    result = CliRunner().invoke(app, ["bench", "train", "--data", str(shards), "--variants", "fast-fp32-cl",
                                      "--json", str(tmp_path / "x.json")])
    assert result.exit_code == 1 and "variant 'fast-fp32-cl'" in result.output


def test_bench_loader_times_both_cpu_engines_in_turns(tmp_path):
    shards = make_shards(tmp_path / "shards")
    out = tmp_path / "engines.json"
    run_bench("loader", "--data", str(shards), "--kinds", "resident", "--sizes", "48", "--batches", "2",
              "--batch-size", "8", "--warmup", "1", "--repeats", "2", "--device", "cpu",
              "--cpu-engines", "compiled,reference", "--json", str(out))
    payload = json.loads(out.read_text())
    rows = {r["cpu_engine"]: r for r in payload["results"]}
    assert set(rows) == {"compiled", "reference"}
    assert (rows["compiled"]["engine"], rows["reference"]["engine"]) == ("compiled_explicit", "reference")
    assert all(len(r["all_images_per_s"]) == 2 and r["first_batch_s"] >= r["one_time_s"] >= 0 for r in rows.values())
    assert set(payload["cpu_engine_ratios"]["resident"]["48"]) == {"compiled/reference"}
    assert payload["config"]["cpu_engines"] == ["compiled", "reference"]


def test_bench_options_are_checked_before_anything_runs(tmp_path):
    shards = make_shards(tmp_path / "shards")
    for args, message in ((["loader", "--cpu-engines", "fast"], "cpu engine(s) ['fast']"),
                          (["loader", "--dtype", "float64"], "dtype 'float64'"),
                          (["train", "--sizes", "48,big"], "expected whole numbers"),
                          (["train", "--cpu-augment", "fast"], "cpu augment 'fast'")):
        result = CliRunner().invoke(app, ["bench", *args, "--data", str(shards), "--json", str(tmp_path / "x.json")])
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "x.json").exists()


def test_bench_train_default_variants_follow_the_device():
    import torch

    from benchmarks.bench_train import default_variants

    assert default_variants(torch.device("cpu"))[0] == "eager-fp32-cl"  # what facesense train runs on a CPU
    assert default_variants(torch.device("cuda"))[0] == "compiled-amp-cl"


def test_bench_train_end_to_end_takes_the_cpu_engine_asked_for(tmp_path):
    shards = make_shards(tmp_path / "shards")
    out = tmp_path / "train.json"
    run_bench("train", "--data", str(shards), "--sizes", "48", "--model", "test_efficientnet", "--device", "cpu",
              "--variants", "eager-fp32-cl", "--loaders", "resident", "--cpu-augment", "reference",
              "--batch-size", "8", "--steps", "1", "--warmup", "1", "--repeats", "1", "--json", str(out))
    payload = json.loads(out.read_text())
    [e2e] = [r for r in payload["results"] if r["mode"] == "end_to_end"]
    assert e2e["engine"] == "reference" and payload["config"]["cpu_augment"] == "reference"


# --------------------------------------------------------------------------------------
# Options no benchmark can run with: one `error: ...` line, exit 1, no result file, nothing run
# --------------------------------------------------------------------------------------

# What each benchmark does first once its options are checked: patched to fail, so a case that got past
# validation shows as a failure here instead of running (or half-running) a benchmark.
WORK = {"bench_pack": ("median_time", "make_csv"), "bench_augment": ("time_engine",),
        "bench_loader": ("make_loader", "time_loaders"), "bench_train": ("Step", "make_loader", "_time"),
        "bench_predict": ("_faces",)}

CUDA = __import__("torch").cuda.is_available()

BAD_OPTIONS = [  # (case, command line, the error line's start); {data}: tiny shards, {model}: a file
    ("train-unknown-model", "train --data {data} --model notamodel",
     "error: --model 'notamodel': not a timm model"),
    ("predict-no-photos", "predict --model {model} --data {data} --photos 0 --video-frames 0",
     "error: --photos 0: must be positive"),
    ("predict-no-video-frames", "predict --model {model} --data {data} --video-frames 0",
     "error: --video-frames 0: must be positive"),
    ("margin-not-a-number", "margin --model {model} --data {data} --margins 0,abc",
     "error: --margins '0,abc': expected numbers separated by commas"),
    ("margin-empty-crop", "margin --model {model} --data {data} --margins 0,-0.5",
     "error: --margins -0.5: must be above -0.5"),
    ("pack-no-data", "pack --data nowhere", "error: --data nowhere: no such file or directory"),
    ("pack-not-a-folder-tree", "pack --data {data}", "error: --data {data}: not a FER2013 image-folder layout"),
    ("augment-cuda-absent", "augment --device cuda", "error: --device cuda: CUDA is not available"),
    ("augment-no-iters", "augment --device cpu --iters 0", "error: --iters 0: must be positive"),
    ("loader-no-batches", "loader --data {data} --batches 0", "error: --batches 0: must be positive"),
    ("loader-sizes-not-numbers", "loader --data {data} --sizes abc",
     "error: --sizes 'abc': expected whole numbers separated by commas"),
    ("loader-no-repeats", "loader --data {data} --repeats 0", "error: --repeats 0: must be positive"),
    ("loader-size-zero", "loader --data {data} --sizes 0,48", "error: --sizes 0: must be between 8 and 1024"),
    ("loader-unknown-kind", "loader --data {data} --kinds fast", "error: --kinds 'fast': expected one or more"),
    ("loader-bad-device", "loader --data {data} --device gpu", "error: --device 'gpu': expected auto, cpu"),
    ("loader-batch-over-split", "loader --data {data} --batch-size 51",
     "error: --batch-size 51: more than the 50 images"),
    ("train-no-repeats", "train --data {data} --repeats 0", "error: --repeats 0: must be positive"),
    ("train-no-steps", "train --data {data} --steps 0", "error: --steps 0: must be positive"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-options")
    model = root / "model.pt"
    model.write_bytes(b"")  # never read: every case is refused before
    return make_shards(root / "shards"), model


@pytest.mark.parametrize("args, expected", [
    pytest.param(args, expected, id=case,
                 marks=[pytest.mark.skipif(CUDA, reason="CUDA is available here")] if "cuda" in case else [])
    for case, args, expected in BAD_OPTIONS])
def test_bench_refuses_an_option_it_cannot_run_with(tiny, tmp_path, monkeypatch, args, expected):
    import importlib

    data, model = tiny
    for module, names in WORK.items():
        mod = importlib.import_module(f"benchmarks.{module}")
        for name in names:
            monkeypatch.setattr(mod, name, _ran(f"{module}.{name}"), raising=False)
    out = tmp_path / "result.json"
    argv = [a.format(data=data, model=model) for a in args.split()]
    result = CliRunner().invoke(app, ["bench", *argv, "--json", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, (result.output, result.exception)
    assert lines[0].startswith(expected.format(data=data)), lines
    assert not out.exists()


def _ran(what: str):
    def ran(*args, **kwargs):
        raise AssertionError(f"{what} ran: the options were not checked first")

    return ran
