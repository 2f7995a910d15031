"""Benchmark commands run end to end on tiny data and write the JSON keys users rely on.

These check the commands and their result files, never a timing.
"""
from __future__ import annotations

import json

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
