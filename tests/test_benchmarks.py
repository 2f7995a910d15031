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
        "bench_predict": ("_faces",), "bench_storage": ("time_packs",), "bench_decode": ("make_jpegs",),
        "bench_stream": ("pack_fer", "pack_colour_set"), "bench_memory": ("run_case",)}

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
    ("pack-not-a-folder-tree", "pack --data {data}", "error: --data {data}: not an image-folder layout"),
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
    ("storage-no-source", "storage --source nowhere", "error: --source nowhere: no such file or directory"),
    ("storage-no-repeats", "storage --source {data} --repeats 0", "error: --repeats 0: must be positive"),
    ("decode-unknown-decoder", "decode --data {data} --decoders fast", "error: --decoders fast: expected one or more"),
    ("decode-too-many-images", "decode --data {data} --images 1000", "error: --images 1000: more than the 73 faces"),
    ("stream-unknown-model", "stream --source {data} --model notamodel", "error: --model 'notamodel': not a timm model"),
    ("colour-bad-store", "colour --data {data} --store zip", "error: --store 'zip': expected raw or encoded"),
    ("colour-unknown-kind", "colour --data {data} --kinds fast", "error: --kinds 'fast': expected one or more"),
    ("memory-no-multiple", "memory --data {data} --multiples 0,2", "error: --multiples 0: must be positive"),
    ("memory-sizes-not-numbers", "memory --data {data} --batch-sizes a", "error: --batch-sizes 'a': expected whole"),
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


# --------------------------------------------------------------------------------------
# Issue 16: storage, decode, stream, colour, memory (tiny data; the commands and their files, no timings)
# --------------------------------------------------------------------------------------

def fer_folder(root, per_class=3):
    """A tiny FER2013 image-folder source (train/ and test/, the seven classes, 48x48 gray JPEGs)."""
    import numpy as np
    from PIL import Image

    from pipeline.classes import FER2013_CLASSES

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, name in enumerate(FER2013_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class if split == "test" else 2 * per_class):
                pixels = np.clip(30 * k + rng.integers(0, 40, (48, 48)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def test_bench_storage_json(tmp_path):
    source = fer_folder(tmp_path / "fer")
    out = tmp_path / "storage.json"
    run_bench("storage", "--source", str(source), "--repeats", "1", "--workers", "1", "--json", str(out))
    payload = json.loads(out.read_text())
    packs = {p["store"]: p for p in payload["packs"]}
    assert set(packs) == {"raw", "encoded"} and all(p["images"] == 63 and p["images_per_s"] > 0 for p in packs.values())
    assert len(packs["raw"]["all_seconds"]) == 1 and packs["encoded"]["disk_bytes"] > 0
    for split in ("train", "val"):
        for decoder in ("decoder_pool", "torchvision_cpu"):
            figures = payload["pixels_vs_raw"][split][decoder]
            assert 0 <= figures["differing_pixels_share"] <= 1 and figures["images"] > 0
        assert payload["pixels_vs_raw"][split]["labels_equal"] is True
    # Pillow is the pack's own decoder: the encoded pack decodes to the raw pack's pixels exactly.
    assert payload["max_abs_diff"]["decoder_pool"] == 0
    assert {"machine", "versions", "git_commit", "config"} <= set(payload)


def test_bench_decode_json_skips_what_cannot_run(tmp_path):
    out = tmp_path / "decode.json"
    run_bench("decode", "--data", str(make_shards(tmp_path / "shards")), "--size", "32", "--images", "40",
              "--decoders", "pillow_pool,torchvision_cpu,nvjpeg", "--batch-size", "16", "--repeats", "1",
              "--workers", "1", "--device", "cpu", "--json", str(out))
    rows = {r["decoder"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["pillow_pool"]["images"] == 40 and rows["pillow_pool"]["images_per_s"] > 0
    assert rows["torchvision_cpu"]["vs_pillow"]["max_abs_diff"] >= 0
    assert rows["nvjpeg"] == {"decoder": "nvjpeg", "skipped": "no CUDA device: GPU decode needs a GPU"}


def test_bench_stream_json(tmp_path):
    out = tmp_path / "stream.json"
    run_bench("stream", "--source", str(fer_folder(tmp_path / "fer")), "--model", "test_efficientnet",
              "--batch-size", "8", "--steps", "1", "--warmup", "1", "--repeats", "2", "--decode-threads", "2,1",
              "--device", "cpu", "--json", str(out))
    payload = json.loads(out.read_text())
    rows = {r["source"]: r for r in payload["results"]}
    two, one = "stream (encoded, 2 decoder threads)", "stream (encoded, 1 decoder thread)"
    assert set(rows) == {"synthetic", two, one, "auto (encoded)", "resident (raw)"}
    assert (rows[two]["workers"], rows[one]["workers"]) == (2, 1)
    assert rows[two]["resolved_loader"] == "stream" and "CPU decoder pool x2" in rows[two]["describe"]
    assert "CPU decoder pool x1" in rows[one]["describe"]
    assert rows["auto (encoded)"]["resolved_loader"] == "resident"
    assert all(len(r["all_images_per_s"]) == 2 for r in rows.values())
    assert set(payload["end_to_end_over_ceiling"]) == set(rows) - {"synthetic"}
    assert payload["target"]["target"] == 0.9 and payload["target"]["what"].startswith(two)


def test_bench_colour_json(tmp_path):
    out = tmp_path / "colour.json"
    run_bench("colour", "--data", str(make_shards(tmp_path / "shards")), "--images", "60", "--sizes", "32",
              "--batches", "1", "--batch-size", "8", "--warmup", "1", "--repeats", "2", "--workers", "1",
              "--device", "cpu", "--json", str(out))
    payload = json.loads(out.read_text())
    rows = {r["kind"]: r for r in payload["results"]}
    assert set(rows) == {"resident", "stream", "dataloader"}
    assert all(r["size"] == 32 and len(r["all_images_per_s"]) == 2 and "100x100 RGB" in r["describe"]
               for r in rows.values())
    assert set(payload["speedup_vs_dataloader"]["32"]) == {"resident", "stream"}
    assert set(payload["targets"]["32"]) == {"resident", "stream"}
    made = payload["data_set"]
    assert made["images"] == 60 and made["size"] == 100


def test_colour_set_is_rgb_in_the_rafdb_layout(tmp_path):
    import numpy as np

    from benchmarks.colour_set import make_raf_set
    from pipeline.decode import decode_image

    made = make_raf_set(make_shards(tmp_path / "shards"), tmp_path / "raf", 20, repeat=2)
    assert made["images"] == 40 and made["distinct_images"] == 20
    lines = (tmp_path / "raf" / "EmoLabel" / "list_patition_label.txt").read_text().split("\n")[:-1]
    assert len(lines) == 40 and lines[0] == lines[0].split()[0] + " " + lines[0].split()[1]
    names = [line.split()[0] for line in lines]
    assert len(set(names)) == 40 and sum(n.startswith("test_") for n in names) == 8
    img = decode_image((tmp_path / "raf" / "Image" / "aligned" / "train_00001_aligned.jpg").read_bytes(), 3)
    assert img.shape == (100, 100, 3)
    assert np.abs(img[..., 0].astype(int) - img[..., 2]).mean() > 1  # truly colour, not gray in 3 channels


def test_bench_memory_json(tmp_path):
    out = tmp_path / "memory.json"
    run_bench("memory", "--data", str(make_shards(tmp_path / "shards")), "--images", "60", "--multiples", "1,2",
              "--batch-sizes", "4,8", "--size", "32", "--batches", "2", "--workers", "1", "--no-resident",
              "--json", str(out))
    payload = json.loads(out.read_text())
    cases = {(r["multiple"], r["batch_size"]) for r in payload["results"]}
    assert cases == {(1, 4), (1, 8), (2, 4), (2, 8)} and {r["kind"] for r in payload["results"]} == {"stream"}
    assert all(r["peak_mb"] >= r["baseline_mb"] > 0 and r["images_read"] == 2 * r["batch_size"]
               for r in payload["results"])
    assert payload["packs"]["2"]["images"] == 2 * payload["packs"]["1"]["images"] == 120  # pack carves val from train
    assert set(payload["target"]) >= {"flat_in_data_set", "grows_with_batch", "met", "criterion"}


def test_memory_verdict():
    from benchmarks.bench_memory import verdict

    def rows(peaks):
        return [{"kind": "stream", "multiple": m, "batch_size": b, "loader_peak_mb": p} for (m, b), p in peaks.items()]

    flat = verdict(rows({(1, 64): 60, (1, 256): 140, (4, 64): 62, (4, 256): 143}), [1, 4], [64, 256], 300e6)
    assert flat["met"] and flat["decoded_mb_added"] == 900
    grows = verdict(rows({(1, 64): 60, (1, 256): 140, (4, 64): 900, (4, 256): 990}), [1, 4], [64, 256], 300e6)
    assert not grows["flat_in_data_set"] and not grows["met"]
