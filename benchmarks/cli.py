"""`facesense bench ...`: the benchmark commands, mounted by facesense/cli.py (the only place that imports
benchmarks from facesense). Each writes its JSON result with machine, versions, config and commit."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from facesense.core.errors import FaceSenseError

app = typer.Typer(help="Benchmarks: images/s, recorded with machine, versions and commit.", no_args_is_help=True)


@app.command("pack")
def bench_pack(
    data: Path = typer.Option(Path("../shared/fer2013"), "--data", help="FER2013 image-folder root."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="fer2013.csv to time; default: one made from --data."),
    repeats: int = typer.Option(3, "--repeats", help="Timed repeats (median reported)."),
    json_path: Path = typer.Option(Path("benchmarks/results/pack-cpu.json"), "--json", help="Where to write results."),
):
    """Time pack on the folder and a CSV against a naive one-process PIL loop."""
    from benchmarks.bench_pack import run

    run(data, csv, repeats, json_path)


@app.command("augment")
def bench_augment(
    device: str = typer.Option("auto", "--device", help="Device: auto (cuda if available), cpu, cuda, cuda:N."),
    sizes: str = typer.Option("48,112,224", "--sizes", help="Comma-separated output sizes."),
    dtypes: str = typer.Option("float16,bfloat16", "--dtypes", help="Comma-separated output dtypes: float32, float16, bfloat16."),
    channels: int = typer.Option(3, "--channels", help="Output channels (1 or 3)."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Samples per call."),
    dataset_size: int = typer.Option(28709, "--dataset-size", help="Resident uint8 images to gather from (FER2013 train)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed calls first (include Triton's compile)."),
    repeats: int = typer.Option(7, "--repeats", help="Timed repeats (median reported)."),
    iters: int = typer.Option(10, "--iters", help="Calls per timed repeat."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Where to write results (e.g. benchmarks/results/augment-h100.json)."),
):
    """Augmentation images/s: the pure-torch reference vs the fused Triton kernel (CUDA)."""
    from benchmarks.bench_augment import run

    with _options_checked():
        run(device, [int(s) for s in _csv(sizes)], _csv(dtypes), channels, batch_size, dataset_size, warmup,
            repeats, iters, json_path)


@app.command("loader")
def bench_loader(
    data: Path = typer.Option(Path("data/shards"), "--data", help="Shard directory."),
    kinds: str = typer.Option("resident,dali,dataloader", "--kinds", help="Comma-separated loader kinds."),
    sizes: str = typer.Option("48,112,224", "--sizes", help="Comma-separated output sizes."),
    batches: int = typer.Option(20, "--batches", help="Batches per timed run."),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per batch."),
    split: str = typer.Option("train", "--split", help="Split to read."),
    dtype: str = typer.Option("float32", "--dtype", help="Output dtype: float32, float16, bfloat16."),
    channels: int = typer.Option(3, "--channels", help="Output channels (3 = the baseline's Grayscale(3))."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed batches first."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs (median reported)."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes / DALI threads."),
    device: str = typer.Option("auto", "--device", help="Device: auto (cuda if available), cpu, cuda, cuda:N."),
    json_path: Path = typer.Option(Path("benchmarks/results/loader-cpu.json"), "--json", help="Where to write results."),
):
    """Images/s of each loader kind per output size (after warm-up, synchronised, median)."""
    from benchmarks.bench_loader import DTYPES, run

    if dtype not in DTYPES:
        raise FaceSenseError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    with _options_checked():
        run(data, _csv(kinds), [int(s) for s in _csv(sizes)], batches, batch_size, split, dtype, channels,
            warmup, repeats, workers, device, json_path)


@app.command("train")
def bench_train(
    data: Path = typer.Option(Path("data/shards"), "--data", help="Shard directory."),
    sizes: str = typer.Option("48,112,224", "--sizes", help="Comma-separated image sizes."),
    variants: str = typer.Option("", "--variants", help="Synthetic-step variants, comma-separated, from "
                                 "eager|compiled-fp32|amp-nchw|cl; the first is used end to end. "
                                 "Default: compiled-amp-cl,eager-amp-cl,compiled-fp32-cl,compiled-amp-nchw on CUDA; "
                                 "eager-fp32-cl,eager-fp32-nchw,eager-amp-cl on CPU."),
    loaders: str = typer.Option("auto,resident,dali,dataloader", "--loaders", help="Loader kinds for end_to_end."),
    model: str = typer.Option("efficientnet_b0", "--model", help="timm model name."),
    channels: int = typer.Option(1, "--channels", help="Input channels (1 or 3)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per step."),
    steps: int = typer.Option(10, "--steps", help="Steps per timed run."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps first (include compilation)."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs (median reported)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:N."),
    json_path: Path = typer.Option(Path("benchmarks/results/train-cpu.json"), "--json", help="Where to write results."),
):
    """Training images/s per size: synthetic ceiling per variant, and end to end per loader."""
    import torch

    from benchmarks.bench_train import run

    if not variants:
        variants = ("compiled-amp-cl,eager-amp-cl,compiled-fp32-cl,compiled-amp-nchw" if torch.cuda.is_available()
                    else "eager-fp32-cl,eager-fp32-nchw,eager-amp-cl")
    with _options_checked():
        run(data, [int(s) for s in _csv(sizes)], _csv(variants), _csv(loaders), model, channels, batch_size,
            steps, warmup, repeats, device, json_path)


@app.command("predict")
def bench_predict(
    model: Path = typer.Option(Path("model/best.pt"), "--model", help="Checkpoint to time (exported to ONNX here too)."),
    data: Optional[Path] = typer.Option(Path("data/shards"), "--data", help="Shards whose val faces are classified "
                                        "(made-up faces when absent)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Faces per classification call."),
    photos: int = typer.Option(20, "--photos", help="640x480 single-face photos per timed run."),
    video_frames: int = typer.Option(150, "--video-frames", help="Frames of the 640x480 test video."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs (median reported)."),
    json_path: Path = typer.Option(Path("benchmarks/results/predict-cpu.json"), "--json", help="Where to write results."),
):
    """Faces/s of classification (PyTorch, onnxruntime) and photos/s, frames/s with detection at 640x480."""
    from benchmarks.bench_predict import run

    run(model, data, batch_size, photos, repeats, video_frames, json_path)


@app.command("margin")
def bench_margin(
    model: Path = typer.Option(Path("model/best.pt"), "--model", help="Checkpoint to score crops with."),
    data: Path = typer.Option(Path("data/shards"), "--data", help="Shards whose val faces are used."),
    margins: str = typer.Option("-0.15,-0.1,-0.05,0,0.05,0.1,0.2,0.3", "--margins", help="Margins to try "
                                 "(fraction of the box side per side; negative crops inside the box)."),
    limit: int = typer.Option(4000, "--limit", help="Val faces to use at most."),
    json_path: Path = typer.Option(Path("benchmarks/results/margin-cpu.json"), "--json", help="Where to write results."),
):
    """Accuracy of val faces found by the detector on a canvas, per crop margin (how predict's margin was chosen)."""
    from benchmarks.bench_predict import margin_sweep

    margin_sweep(model, data, [float(m) for m in _csv(margins)], limit, json_path)


@contextmanager
def _options_checked():
    """The benchmarks check their options with ValueError: show those as one-line errors."""
    try:
        yield
    except ValueError as exc:
        raise FaceSenseError(str(exc)) from exc


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
