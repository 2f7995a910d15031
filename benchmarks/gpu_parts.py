"""The parts of the GPU check (`benchmarks/gpu_check.py`), one per process.

    python -m benchmarks.gpu_parts PART SETTINGS.json RESULT.json

The check runs every part in its own process with a time box, so a crash, a hang or a
CUDA error in one part never loses the others. A part writes its figures to RESULT.json
as {"status": "ok" | "skipped", ...}; a part that raises is reported as failed by the
check, with the last lines of its output.

Settings (a JSON object): data, scratch (a folder for the part's files), smoke (tiny sizes
on CPU), deadline_s (seconds this part may take; the accuracy part stops its training
early enough to evaluate what it has).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.env import ROOT, child_env

TINY_MODEL = "test_efficientnet"  # timm's ~100k-parameter EfficientNet: the real code path, seconds on a CPU

# What the issue measures against (figures, not assertions).
TARGETS = {"triton_224_fp16_images_per_s": 200_000, "end_to_end_over_ceiling": 0.97,
           "resident_over_dataloader_224": 10.0, "val_accuracy": 0.70, "encoded_end_to_end_over_ceiling": 0.97}


def has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def save_partial(settings: dict, result: dict) -> None:
    """Write what is finished so far: if the time box ends this part, the check keeps it."""
    Path(settings["result"]).write_text(json.dumps({**result, "partial": True}, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------------------
# tests: the CUDA tests (Triton compiled vs reference, DALI GPU, CUDA loaders, AMP + compile step)
# --------------------------------------------------------------------------------------

def part_tests(settings: dict) -> dict:
    if settings["smoke"]:  # the same path on a selection that runs in seconds on a CPU
        selection = ["tests/test_amp.py"]
    else:
        selection = ["tests/test_kernels.py", "tests/test_amp.py", "tests/test_loaders.py::test_gpu_loaders_return_cuda_channels_last"]
        if has_dali():
            selection += ["tests/test_dali.py"]
    log = Path(settings["scratch"]) / "tests.log"
    timeout = max(10, settings["deadline_s"] - 5)
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *selection],
                                  cwd=ROOT, env=child_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    text = log.read_text()
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text.splitlines()[-1]
                                               if text.strip() else "")}
    result = {"selection": selection, "counts": counts, "log": "tests.log",
              "dali": "installed" if has_dali() else "skipped: DALI not installed"}
    if code is None:
        return {**result, "status": "failed", "error": f"pytest timed out after {timeout:.0f} s"}
    return {**result, "status": "ok" if code == 0 else "failed",
            **({} if code == 0 else {"error": "\n".join(text.splitlines()[-15:])})}


# --------------------------------------------------------------------------------------
# augment: Triton vs reference images/s at 48/112/224, fp16/bf16
# --------------------------------------------------------------------------------------

def part_augment(settings: dict) -> dict:
    from benchmarks.bench_augment import run

    rows, notes = [], []
    for size in [48] if settings["smoke"] else [48, 112, 224]:  # one size at a time: a time box keeps the rest
        if settings["smoke"]:
            payload = run("cpu", [size], ["float16"], 3, 64, 512, 1, 1, 1, None)
        else:
            payload = run("cuda", [size], ["float16", "bfloat16"], 3, 1024, 28709, 5, 5, 10, None)
        rows += payload["results"]
        notes = payload["notes"]
        save_partial(settings, {"status": "ok", "results": rows, "notes": notes})
    at_224 = next((r for r in rows if r["size"] == 224 and r["dtype"] == "float16" and "triton" in r), None)
    target = None
    if at_224:
        value = at_224["triton"]["images_per_s"]
        target = {"value": value, "target": TARGETS["triton_224_fp16_images_per_s"],
                  "met": value >= TARGETS["triton_224_fp16_images_per_s"]}
    return {"status": "ok", "results": rows, "notes": notes, "target_triton_224_fp16": target}


# --------------------------------------------------------------------------------------
# loader: resident (Triton), dali, dataloader at 48/112/224
# --------------------------------------------------------------------------------------

def part_loader(settings: dict) -> dict:
    from benchmarks.bench_loader import run

    kinds = ["resident", "dataloader"] + (["dali"] if has_dali() else [])
    notes = [] if has_dali() else ["dali skipped: DALI not installed"]
    json_path = Path(settings["scratch"]) / "loader.json"
    rows = []
    for size in [48] if settings["smoke"] else [48, 112, 224]:
        if settings["smoke"]:
            payload = run(Path(settings["data"]), kinds, [size], 2, 16, "train", "float32", 3, 1, 1, 0, "cpu",
                          json_path)
        else:
            payload = run(Path(settings["data"]), kinds, [size], 20, 256, "train", "float16", 3, 3, 3,
                          min(8, os.cpu_count() or 1), "cuda", json_path)
        rows += payload["results"]
        save_partial(settings, {"status": "ok", "results": rows, "notes": notes})
    return {"status": "ok", "results": rows, "notes": notes}


# --------------------------------------------------------------------------------------
# train: synthetic ceiling vs end to end per loader, AMP bf16, channels-last, compiled
# --------------------------------------------------------------------------------------

def part_train(settings: dict) -> dict:
    from benchmarks.bench_train import run

    loaders = ["resident", "dataloader"] + (["dali"] if has_dali() else [])
    json_path = Path(settings["scratch"]) / "train.json"
    rows, ratios = [], {}
    for size in [48] if settings["smoke"] else [48, 112, 224]:  # one size at a time: a time box keeps the rest
        if settings["smoke"]:
            payload = run(Path(settings["data"]), [size], ["eager-fp32-cl"], loaders, TINY_MODEL, 1, 16, 2, 1, 1,
                          "cpu", json_path)
        else:
            payload = run(Path(settings["data"]), [size], ["compiled-amp-cl", "eager-amp-cl"], loaders,
                          "efficientnet_b0", 1, 256, 20, 5, 3, "cuda", json_path)
        rows += payload["results"]
        ratios.update(payload["end_to_end_over_ceiling"])
        save_partial(settings, {"status": "ok", "results": rows, "end_to_end_over_ceiling": ratios})
    compile_s = {str(r["size"]): r["warmup_s"] for r in rows
                 if r["mode"] == "synthetic" and r["variant"].startswith("compiled")}

    def rate(size: int, loader: str):
        return next((r["images_per_s"] for r in rows if r["size"] == size and r["mode"] == "end_to_end"
                     and r["loader"] == loader and "images_per_s" in r), None)

    big = max(int(s) for s in ratios)
    resident, baseline = rate(big, "resident"), rate(big, "dataloader")
    return {"status": "ok", "results": rows, "end_to_end_over_ceiling": ratios, "warmup_incl_compile_s": compile_s,
            "targets": {
                "end_to_end_over_ceiling": {size: {"value": r.get("resident"), "target": TARGETS["end_to_end_over_ceiling"],
                                                   "met": (r.get("resident") or 0) >= TARGETS["end_to_end_over_ceiling"]}
                                            for size, r in ratios.items()},
                f"resident_over_dataloader_{big}": {
                    "value": resident / baseline if resident and baseline else None,
                    "target": TARGETS["resident_over_dataloader_224"],
                    "met": bool(resident and baseline and resident / baseline >= TARGETS["resident_over_dataloader_224"])}}}


# --------------------------------------------------------------------------------------
# decode, stream: encoded shards on the GPU (issue 16); GPU-only, skipped with the reason elsewhere
# --------------------------------------------------------------------------------------

DECODE_SIZE, DECODE_IMAGES = 224, 4096
STREAM_SIZES = (112, 224)
STREAM_IMAGES = 8192  # colour 100x100 faces in the encoded set (RAF-DB has 15,339; fewer pack faster)
# Eager, not compiled: two B0 compiles (112 and 224 px) would not fit the part's box. The ratio compares
# the data path with the very step it feeds, so it holds for that step.
STREAM_STEP = {"model": "efficientnet_b0", "variant": "eager-amp-cl", "channels": 3, "batch_size": 256,
               "steps": 10, "warmup": 3, "repeats": 3}


def gpu_only_skip(settings: dict) -> dict | None:
    """The entry of a part that measures the GPU only, where there is none to measure (a smoke run is a
    CPU run); None where it can run."""
    if settings.get("smoke"):
        return {"status": "skipped", "reason": "smoke run (CPU): this part measures the GPU only"}
    if cuda_devices() == 0:
        return {"status": "skipped", "reason": "no CUDA device: this part measures the GPU only"}
    return None


def _faces(settings: dict) -> int:
    from pipeline.shards import load_manifest

    return sum(e["count"] for e in load_manifest(settings["data"])["splits"].values())


def part_decode(settings: dict) -> dict:
    """JPEG decode images/s at 224 px: torchvision nvJPEG and DALI mixed (skipped with the reason where
    DALI is absent), with the CPU decoder pool beside them; each decoder's pixels against Pillow's."""
    return gpu_only_skip(settings) or gpu_decode(settings, _cuda(), DECODE_SIZE, DECODE_IMAGES,
                                                 ["pillow_pool", "nvjpeg", "dali_mixed"], 256, 5)


def gpu_decode(settings: dict, device, size: int, images: int, decoders: list[str], batch_size: int,
               repeats: int) -> dict:
    """The decode part's measurement on `device` (a test runs it on the CPU with CPU decoders)."""
    from benchmarks.bench_decode import decode_rates, make_jpegs

    blobs = make_jpegs(Path(settings["data"]), min(images, _faces(settings)), size)
    rows = decode_rates(blobs, size, decoders, batch_size, repeats, min(8, os.cpu_count() or 1), device)
    notes = [f"{r['decoder']} skipped: {r['skipped']}" for r in rows if "skipped" in r]
    return {"status": "ok", "size": size, "images": len(blobs), "results": rows, "notes": notes}


def part_stream(settings: dict) -> dict:
    """End to end with encoded shards at 112 and 224 px against the synthetic ceiling: a colour 100x100
    RAF-layout set made from the data's faces, packed --store encoded, through --loader stream (nvJPEG,
    or DALI where installed) and auto (resident: decoded once, the Triton engine)."""
    return gpu_only_skip(settings) or encoded_end_to_end(settings, _cuda(), STREAM_SIZES, STREAM_IMAGES,
                                                         STREAM_STEP)


def encoded_end_to_end(settings: dict, device, sizes, images: int, step: dict) -> dict:
    """The stream part's measurement on `device` (a test runs it on the CPU with a tiny model)."""
    from benchmarks.bench_stream import end_to_end, pack_colour_set

    scratch = Path(settings["scratch"])
    shards, made = pack_colour_set(Path(settings["data"]), scratch, min(images, _faces(settings)), "encoded")
    rows, ratios, describe = [], {}, {}
    result = {"status": "ok", "data_set": made, "step": step, "results": rows, "end_to_end_over_ceiling": ratios,
              "describe": describe}
    for size in sizes:  # one size at a time: a time box keeps the sizes finished
        out = end_to_end({"stream": (shards, "stream"), "auto": (shards, "auto")}, size, step["model"],
                         step["variant"], step["channels"], step["batch_size"], step["steps"], step["warmup"],
                         step["repeats"], device, min(8, os.cpu_count() or 1))
        rows += out["rows"]
        ratios[str(size)] = out["end_to_end_over_ceiling"]
        describe[str(size)] = out["describe"]
        save_partial(settings, result)
    target = TARGETS["encoded_end_to_end_over_ceiling"]
    result["targets"] = {size: {loader: {"value": v, "target": target, "met": v >= target} for loader, v in r.items()}
                         for size, r in ratios.items()}
    return result


def _cuda():
    import torch

    return torch.device("cuda")


# --------------------------------------------------------------------------------------
# accuracy: the GPU recipe on the real data, time-boxed, selected on val, evaluated on val and test
# --------------------------------------------------------------------------------------

EVAL_RESERVE_S = 60  # kept back from the training's time box for the evaluations and the fp16 check


def part_accuracy(settings: dict) -> dict:
    from facesense.core.checkpoint import load_checkpoint, save_checkpoint, shipping_snapshot
    from facesense.eval.report import evaluate_checkpoint
    from pipeline.shards import load_manifest

    scratch = Path(settings["scratch"])
    run_dir = scratch / "run"
    args = ["train", "--config", str(ROOT / "recipes" / "gpu.toml"), "--data", settings["data"], "--out", str(run_dir),
            "--overwrite"]
    if settings["smoke"]:
        args += ["--model", TINY_MODEL, "--img-size", "48", "--batch-size", "16", "--epochs", "2", "--max-steps", "6",
                 "--device", "cpu", "--no-compile", "--workers", "0", "--log-every", "2"]
    box = max(10.0, settings["deadline_s"] - EVAL_RESERVE_S)
    start = time.perf_counter()
    with open(scratch / "train.log", "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "facesense", *args], cwd=ROOT, env=child_env(), stdout=fh,
                                stderr=subprocess.STDOUT)
        try:
            code, boxed = proc.wait(timeout=box), False
        except subprocess.TimeoutExpired:  # the time box: stop it, keep the best epoch it finished
            proc.terminate()
            code, boxed = proc.wait(timeout=30), True
    train_s = time.perf_counter() - start
    best = run_dir / "best.pt"
    if not best.is_file():
        tail = "\n".join((scratch / "train.log").read_text().splitlines()[-15:])
        raise RuntimeError(f"training wrote no best.pt (exit {code}, {train_s:.0f} s):\n{tail}")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # Ship the selected weights in fp16 (half the size) only if eval agrees with full precision.
    ckpt = load_checkpoint(best)
    shipped = scratch / "best-fp16.pt"
    save_checkpoint(shipped, shipping_snapshot(ckpt))
    device = "cpu" if settings["smoke"] else "cuda"
    full = evaluate_checkpoint(best, Path(settings["data"]), "val", scratch / "eval-fp32", device=device)
    half = evaluate_checkpoint(shipped, Path(settings["data"]), "val", scratch / "eval-val", device=device)
    crops = evaluate_checkpoint(shipped, Path(settings["data"]), "val", scratch / "eval-val-crops", tta="crops",
                                device=device)
    has_test = load_manifest(settings["data"])["splits"]["test"]["count"] > 0
    test = evaluate_checkpoint(shipped, Path(settings["data"]), "test", scratch / "eval-test", device=device) \
        if has_test else None
    figures = ("accuracy", "auc_macro_ovr", "f1_weighted")
    top = max(history, key=lambda r: r["val_accuracy"])
    return {
        "status": "ok", "recipe": "recipes/gpu.toml", "smoke": settings["smoke"],
        "time_boxed": boxed, "train_exit_code": code, "train_wall_s": train_s,
        "epochs_done": len(history), "training_s": sum(r["epoch_time_s"] for r in history),
        "selected_epoch": top["epoch"],
        "val": {k: half[k] for k in figures}, "val_tta_crops": {k: crops[k] for k in figures},
        "test": {k: test[k] for k in figures} if test else None,
        "fp16_vs_fp32_val_accuracy": [half["accuracy"], full["accuracy"]],
        "fp16_agrees": abs(half["accuracy"] - full["accuracy"]) <= 0.001,
        "target_val_accuracy": {"value": half["accuracy"], "target": TARGETS["val_accuracy"],
                                "met": half["accuracy"] >= TARGETS["val_accuracy"]},
        "files": {"best.pt": str(shipped if abs(half["accuracy"] - full["accuracy"]) <= 0.001 else best),
                  "metrics.jsonl": str(run_dir / "metrics.jsonl"),
                  "report.json": str(scratch / ("eval-test" if test else "eval-val") / "report.json")},
    }


# --------------------------------------------------------------------------------------
# ddp: the synthetic training step on 1 GPU and on all of them (torchrun), scaling efficiency
# --------------------------------------------------------------------------------------

DDP_SIZES = (112, 224)
# Eager, not compiled: four launches (2 sizes x 1 and N GPUs) of four compiles each would not fit the box.
DDP_STEP = {"model": "efficientnet_b0", "variant": "eager-amp-cl", "channels": 1, "batch_size": 256, "steps": 20,
            "warmup": 5, "repeats": 3}
DDP_STOP_S = 10  # for a torchrun stopped at the end of its time: SIGTERM, then this long before SIGKILL
# Kept back from the part's box: a torchrun killed by the box (SIGKILL) would leave its ranks running.
DDP_RESERVE_S = DDP_STOP_S + 5


def cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ddp_skipped(gpus: int) -> dict | None:
    """The ddp part's entry where it cannot measure anything (fewer than two GPUs), else None."""
    if gpus >= 2:
        return None
    return {"status": "skipped", "reason": f"{'one GPU' if gpus == 1 else 'no GPU'}: DDP scaling needs at least two",
            "gpus": gpus}


def part_ddp(settings: dict) -> dict:
    gpus = 0 if settings["smoke"] else cuda_devices()  # smoke: a CPU run
    return ddp_skipped(gpus) or ddp_scaling(settings, gpus, "cuda", DDP_SIZES, DDP_STEP)


def ddp_scaling(settings: dict, gpus: int, device: str, sizes, step: dict) -> dict:
    """Per size, the synthetic step launched on 1 and on `gpus` processes; scaling efficiency
    images/s(N) / (N x images/s(1)). A launch that fails or runs out of time ends the part as failed, with
    the launches already finished."""
    scratch = Path(settings["scratch"])
    end = time.monotonic() + settings["deadline_s"] - DDP_RESERVE_S
    rows, efficiency = [], {}
    result = {"status": "ok", "gpus": gpus, "step": {**step, "device": device}, "results": rows,
              "scaling_efficiency": efficiency}
    for size in sizes:
        rates = {}
        for n in (1, gpus):
            try:
                row = launch_ddp(n, size, device, step, scratch, end - time.monotonic())
            except RuntimeError as exc:
                return {**result, "status": "failed", "error": str(exc)}
            rows.append(row)
            rates[n] = row["images_per_s"]
            save_partial(settings, result)
        efficiency[str(size)] = rates[gpus] / (gpus * rates[1])
        save_partial(settings, result)
    return result


def launch_ddp(nproc: int, size: int, device: str, step: dict, scratch: Path, timeout: float) -> dict:
    """One `python -m torch.distributed.run --nproc_per_node nproc` of benchmarks.bench_train: rank 0's row."""
    what = f"DDP on {nproc} process(es) at {size} px"
    if timeout < 10:
        raise RuntimeError(f"{what}: no time left in the part's box")
    row_path, log_path = scratch / f"ddp-{size}px-{nproc}.json", scratch / f"ddp-{size}px-{nproc}.log"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "benchmarks.bench_train", "--size", str(size), "--device", device, "--json", str(row_path)]
    for key, value in step.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun hands SIGTERM to its ranks and waits for them
            try:
                proc.wait(timeout=DDP_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = None
    tail = "\n".join(log_path.read_text().strip().splitlines()[-15:])
    if code is None:
        raise RuntimeError(f"{what}: timed out after {timeout:.0f} s\n{tail}")
    if code != 0 or not row_path.is_file():
        raise RuntimeError(f"{what}: exit code {code}\n{tail}")
    return json.loads(row_path.read_text())


# The parts in the order the check runs them (gpu_check.PARTS is this order).
PARTS = {"tests": part_tests, "augment": part_augment, "loader": part_loader, "train": part_train,
         "decode": part_decode, "stream": part_stream, "accuracy": part_accuracy, "ddp": part_ddp}


def main(argv: list[str]) -> None:
    name, settings_path, result_path = argv
    settings = {**json.loads(Path(settings_path).read_text()), "result": result_path}
    result = PARTS[name](settings)
    Path(result_path).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
