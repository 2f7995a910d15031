"""`facesense bench ...`: the benchmark commands, mounted by facesense/cli.py (the only place that imports
benchmarks from facesense). Each writes its JSON result with machine, versions, config and commit.

Each benchmark checks every option before it runs anything: an option it cannot run with (a count under
1, a size or device it cannot use, data that is not there) is benchmarks.env.BadOption, a FaceSenseError,
which the CLI root prints as one `error: ...` line with exit code 1; no result file is written."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from benchmarks.env import BadOption

app = typer.Typer(help="Benchmarks: images/s, recorded with machine, versions and commit.", no_args_is_help=True)

# The options several commands share (each command gives its own default).
Shards = Annotated[Path, typer.Option("--data", help="Shard directory.")]
Sizes = Annotated[str, typer.Option("--sizes", help="Comma-separated output (image) sizes.")]
Channels = Annotated[int, typer.Option("--channels", help="Image channels: 1 (gray) or 3 (gray replicated, "
                                       "the baseline's Grayscale(3)).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per batch (an augment call, a training step).")]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed batches or calls first (include any compilation).")]
Repeats = Annotated[int, typer.Option("--repeats", help="Timed runs (median reported).")]
Device = Annotated[str, typer.Option("--device", help="Device: auto (cuda if available), cpu, cuda, cuda:N.")]
ResultJson = Annotated[Path, typer.Option("--json", help="Where to write results.")]


@app.command("pack")
def bench_pack(
    data: Path = typer.Option(Path("../shared/fer2013"), "--data", help="FER2013 image-folder root."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="fer2013.csv to time; default: one made from --data."),
    repeats: Repeats = 3,
    json_path: ResultJson = Path("benchmarks/results/pack-cpu.json"),
):
    """Time pack on the folder and a CSV against a naive one-process PIL loop."""
    from benchmarks.bench_pack import run

    run(data, csv, repeats, json_path)


@app.command("augment")
def bench_augment(
    device: Device = "auto",
    sizes: Sizes = "48,112,224",
    dtypes: str = typer.Option("float16,bfloat16", "--dtypes", help="Comma-separated output dtypes: float32, float16, bfloat16."),
    channels: Channels = 3,
    batch_size: BatchSize = 1024,
    dataset_size: int = typer.Option(28709, "--dataset-size", help="Resident uint8 images to gather from (FER2013 train)."),
    warmup: Warmup = 5,
    repeats: Repeats = 7,
    iters: int = typer.Option(10, "--iters", help="Calls per timed repeat."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Where to write results (e.g. benchmarks/results/augment-h100.json)."),
):
    """Augmentation images/s: the pure-torch reference vs the fused Triton kernel (CUDA)."""
    from benchmarks.bench_augment import run

    run(device, _ints(sizes), _csv(dtypes), channels, batch_size, dataset_size, warmup, repeats, iters, json_path)


@app.command("loader")
def bench_loader(
    data: Shards = Path("data/shards"),
    kinds: str = typer.Option("resident,dali,dataloader", "--kinds", help="Comma-separated loader kinds."),
    sizes: Sizes = "48,112,224",
    batches: int = typer.Option(20, "--batches", help="Batches per timed run."),
    batch_size: BatchSize = 256,
    split: str = typer.Option("train", "--split", help="Split to read."),
    dtype: str = typer.Option("float32", "--dtype", help="Output dtype: float32, float16, bfloat16."),
    channels: Channels = 3,
    warmup: Warmup = 3,
    repeats: Repeats = 3,
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes / DALI threads."),
    device: Device = "auto",
    cpu_engines: str = typer.Option("compiled", "--cpu-engines", help="Resident loader on a CPU: augmentation "
                                    "engines to time, comma-separated, in turns: compiled (torch.compile), "
                                    "reference (pure torch)."),
    json_path: ResultJson = Path("benchmarks/results/loader-cpu.json"),
):
    """Images/s of each loader kind per output size (after warm-up, synchronised, median)."""
    from benchmarks.bench_loader import run

    run(data, _csv(kinds), _ints(sizes), batches, batch_size, split, dtype, channels, warmup, repeats,
        workers, device, json_path, _csv(cpu_engines))


@app.command("train")
def bench_train(
    data: Shards = Path("data/shards"),
    sizes: Sizes = "48,112,224",
    variants: str = typer.Option("", "--variants", help="Synthetic-step variants, comma-separated, from "
                                 "eager|compiled-fp32|amp-nchw|cl; the first is used end to end. "
                                 "Default (bench_train.DEFAULT_VARIANTS): compiled-amp-cl,eager-amp-cl,"
                                 "compiled-fp32-cl,compiled-amp-nchw on CUDA; "
                                 "eager-fp32-cl,eager-fp32-nchw,eager-amp-cl on CPU."),
    loaders: str = typer.Option("auto,resident,dali,dataloader", "--loaders", help="Loader kinds for end_to_end."),
    model: str = typer.Option("efficientnet_b0", "--model", help="timm model name."),
    channels: Channels = 1,
    batch_size: BatchSize = 128,
    steps: int = typer.Option(10, "--steps", help="Steps per timed run."),
    warmup: Warmup = 3,
    repeats: Repeats = 3,
    device: Device = "auto",
    cpu_augment: str = typer.Option("", "--cpu-augment", help="End to end on a CPU: the resident loader's "
                                    "augmentation engine, compiled or reference. Default: compiled exactly "
                                    "when the first variant is."),
    json_path: ResultJson = Path("benchmarks/results/train-cpu.json"),
):
    """Training images/s per size: synthetic ceiling per variant, and end to end per loader."""
    from benchmarks.bench_train import run

    run(data, _ints(sizes), _csv(variants), _csv(loaders), model, channels, batch_size, steps, warmup,
        repeats, device, json_path, cpu_augment or None)


@app.command("predict")
def bench_predict(
    model: Path = typer.Option(Path("model/best.pt"), "--model", help="Checkpoint to time (exported to ONNX here too)."),
    data: Optional[Path] = typer.Option(Path("data/shards"), "--data", help="Shards whose val faces are classified "
                                        "(made-up faces when absent)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Faces per classification call."),
    photos: int = typer.Option(20, "--photos", help="640x480 single-face photos per timed run."),
    video_frames: int = typer.Option(150, "--video-frames", help="Frames of the 640x480 test video."),
    repeats: Repeats = 3,
    json_path: ResultJson = Path("benchmarks/results/predict-cpu.json"),
):
    """Faces/s of classification (PyTorch, onnxruntime) and photos/s, frames/s with detection at 640x480."""
    from benchmarks.bench_predict import run

    run(model, data, batch_size, photos, repeats, video_frames, json_path)


@app.command("margin")
def bench_margin(
    model: Path = typer.Option(Path("model/best.pt"), "--model", help="Checkpoint to score crops with."),
    data: Annotated[Path, typer.Option("--data", help="Shards whose val faces are used.")] = \
        Path("data/shards"),
    margins: str = typer.Option("-0.15,-0.1,-0.05,0,0.05,0.1,0.2,0.3", "--margins", help="Margins to try "
                                 "(fraction of the box side per side; negative crops inside the box)."),
    limit: int = typer.Option(4000, "--limit", help="Val faces to use at most."),
    json_path: ResultJson = Path("benchmarks/results/margin-cpu.json"),
):
    """Accuracy of val faces found by the detector on a canvas, per crop margin (how predict's margin was chosen)."""
    from benchmarks.bench_predict import margin_sweep

    margin_sweep(model, data, _floats(margins, "--margins"), limit, json_path)


# --------------------------------------------------------------------------------------
# Issue 16: storage, decode, encoded shards through the loaders, memory
# --------------------------------------------------------------------------------------

FerFaces = Annotated[Path, typer.Option("--data", help="Raw FER2013 shards whose faces make the colour set.")]
SetImages = Annotated[int, typer.Option("--images", help="Faces in the colour RAF-layout set (RAF-DB: 15,339).")]
Workers = Annotated[int, typer.Option("--workers", help="Decoder threads / DataLoader worker processes.")]


@app.command("storage")
def bench_storage(
    source: Path = typer.Option(Path("../shared/fer2013"), "--source", help="FER2013 source to pack (folders or CSV)."),
    repeats: Repeats = 3,
    workers: Workers = 2,
    json_path: ResultJson = Path("benchmarks/results/storage-cpu.json"),
):
    """Pack --store raw vs --store encoded (in turns): images/s, bytes, decoded pixels vs the raw pack."""
    from benchmarks.bench_storage import run

    run(source, repeats, workers, json_path)


@app.command("decode")
def bench_decode(
    data: FerFaces = Path("data/shards"),
    size: int = typer.Option(224, "--size", help="Side of the JPEGs made and decoded."),
    images: int = typer.Option(2048, "--images", help="JPEGs to decode per pass."),
    decoders: str = typer.Option("pillow_pool,torchvision_cpu,nvjpeg,dali_cpu,dali_mixed", "--decoders",
                                 help="Comma-separated: pillow_pool, torchvision_cpu, nvjpeg, dali_cpu, dali_mixed "
                                      "(those that cannot run here are recorded as skipped)."),
    batch_size: BatchSize = 256,
    repeats: Repeats = 3,
    workers: Workers = 2,
    device: Device = "auto",
    json_path: ResultJson = Path("benchmarks/results/decode-cpu.json"),
):
    """JPEG decode images/s per decoder (Pillow pool, torchvision CPU, nvJPEG, DALI cpu/mixed)."""
    from benchmarks.bench_decode import run

    run(data, size, images, _csv(decoders), batch_size, repeats, workers, device, json_path)


@app.command("stream")
def bench_stream(
    source: Path = typer.Option(Path("../shared/fer2013"), "--source", help="FER2013 source, packed raw and encoded."),
    size: int = typer.Option(48, "--size", help="Output (image) size."),
    model: str = typer.Option("efficientnet_b0", "--model", help="timm model name."),
    variant: str = typer.Option("", "--variant", help="Training-step variant (bench train --variants); default: "
                                "what facesense train runs on the device."),
    channels: Channels = 1,
    batch_size: BatchSize = 128,
    steps: int = typer.Option(5, "--steps", help="Steps per timed run."),
    warmup: Warmup = 2,
    repeats: Repeats = 3,
    decode_threads: str = typer.Option("2,1", "--decode-threads", help="The stream loader's decoder threads "
                                       "(its --workers), comma-separated; the target is read on the first."),
    device: Device = "auto",
    json_path: ResultJson = Path("benchmarks/results/stream-cpu.json"),
):
    """--loader stream on encoded FER2013 end to end vs the synthetic ceiling (in turns)."""
    from benchmarks.bench_stream import run_stream

    run_stream(source, size, model, variant, channels, batch_size, steps, warmup, repeats, device,
               _ints(decode_threads, "--decode-threads"), json_path)


@app.command("colour")
def bench_colour(
    data: FerFaces = Path("data/shards"),
    images: SetImages = 15339,
    store: str = typer.Option("encoded", "--store", help="How the colour set is packed: raw or encoded."),
    kinds: str = typer.Option("resident,stream,dataloader", "--kinds", help="Comma-separated loader kinds."),
    sizes: Sizes = "112,224",
    batches: int = typer.Option(10, "--batches", help="Batches per timed run."),
    batch_size: BatchSize = 256,
    warmup: Warmup = 2,
    repeats: Repeats = 3,
    workers: Workers = 2,
    device: Device = "auto",
    json_path: ResultJson = Path("benchmarks/results/colour-cpu.json"),
):
    """Loaders alone on a 100x100 colour RAF-layout set made from FER2013 faces, vs the dataloader."""
    from benchmarks.bench_stream import run_colour

    run_colour(data, images, store, _csv(kinds), _ints(sizes), batches, batch_size, warmup, repeats, workers,
               device, json_path)


@app.command("memory")
def bench_memory(
    data: FerFaces = Path("data/shards"),
    images: SetImages = 15339,
    multiples: str = typer.Option("1,2,4", "--multiples", help="Pack the set this many times over (comma-separated)."),
    batch_sizes: str = typer.Option("64,256", "--batch-sizes", help="Stream loader batch sizes (comma-separated)."),
    size: int = typer.Option(112, "--size", help="Output (image) size."),
    batches: int = typer.Option(20, "--batches", help="Batches read per case."),
    workers: Workers = 2,
    resident: bool = typer.Option(True, "--resident/--no-resident", help="Also the resident loader (the contrast)."),
    json_path: ResultJson = Path("benchmarks/results/memory-cpu.json"),
):
    """Peak RSS of the stream loader (fresh process per case) over data-set multiples and batch sizes."""
    from benchmarks.bench_memory import run

    run(data, images, _ints(multiples, "--multiples"), _ints(batch_sizes, "--batch-sizes"), size, batches, workers,
        resident, json_path)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str, flag: str = "--sizes") -> list[int]:
    """Whole numbers, comma-separated (BadOption, a one-line error, for anything else)."""
    try:
        return [int(part) for part in _csv(text)]
    except ValueError:
        raise BadOption(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 48,112") from None


def _floats(text: str, flag: str) -> list[float]:
    """Numbers, comma-separated (BadOption for anything else, nan and inf included)."""
    try:
        values = [float(part) for part in _csv(text)]
    except ValueError:
        values = None
    if values is None or any(v != v or abs(v) == float("inf") for v in values):
        raise BadOption(f"{flag} {text!r}: expected numbers separated by commas, e.g. -0.05,0,0.1")
    return values
