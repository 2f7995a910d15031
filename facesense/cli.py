"""The `facesense` command line: pack, verify, train, eval, predict, export, bench."""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from facesense.core.errors import FaceSenseError
from pipeline.errors import PackError, ShardError

app = typer.Typer(help="FaceSense: fast, honest facial-expression training on FER2013.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: images/s, recorded with machine, versions and commit.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def pack(
    src: Path = typer.Argument(..., help="FER2013 source: the image-folder root (train/, test/) or fer2013.csv."),
    out: Path = typer.Option(Path("data/shards"), "--out", "-o", help="Output directory for shards + manifest.json."),
    format: str = typer.Option("auto", "--format", help="Source format: auto, folders or csv."),
    ferplus: Optional[Path] = typer.Option(None, "--ferplus", help="fer2013new.csv: relabel the CSV source with FER+ majority votes (8 classes)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of unprefixed train images used as val when the source has no PublicTest images."),
    seed: int = typer.Option(0, "--seed", help="Seed for the val slice and the shuffled shard order."),
    shard_size: int = typer.Option(8192, "--shard-size", help="Images per shard at most."),
    workers: int = typer.Option(0, "--workers", help="Decoding processes (0 = all cores)."),
    resize: bool = typer.Option(False, "--resize", help="Accept images that are not 48x48 and resize them."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad images/rows (listed in the manifest) instead of failing."),
    dedupe: bool = typer.Option(False, "--dedupe", help="Drop train images that duplicate val/test images, and near-blank train images."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when DIR is up to date."),
):
    """Pack FER2013 once into verified HDF5 shards (atomic; does nothing if up to date)."""
    from pipeline.pack import PackOptions, pack as run_pack

    opts = PackOptions(format=format, val_fraction=val_fraction, seed=seed, shard_size=shard_size,
                       resize=resize, skip_bad=skip_bad, dedupe=dedupe,
                       ferplus=str(ferplus.resolve()) if ferplus else None)
    try:
        manifest, built = run_pack(src, out, opts, workers=workers or os.cpu_count(), force=force)
    except PackError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    if not built:
        typer.echo(f"{out}: up to date with {src} (nothing to do; --force rebuilds)")
        return
    counts = ", ".join(f"{s} {e['count']}" for s, e in manifest["splits"].items())
    dup = manifest["duplicates"]["summary"]
    typer.echo(f"packed {out}: {counts}; {len(manifest['classes'])} classes; "
               f"{dup['groups']} duplicate groups ({dup['cross_split_groups']} across splits, "
               f"{dup['conflicting_label_groups']} with conflicting labels), {dup['near_blank']} near-blank"
               + (f"; skipped {len(manifest['skipped'])} bad items" if manifest["skipped"] else ""))


@app.command()
def verify(data: Path = typer.Argument(..., help="Shard directory written by facesense pack.")):
    """Re-hash every shard against manifest.json and check shapes, dtypes and labels."""
    from pipeline.shards import verify as run_verify

    try:
        total = run_verify(data)
    except ShardError as exc:
        fail(str(exc))
    typer.echo(f"{data}: OK ({total} images)")


def _train_options(func):
    """Give `func` one option per TrainConfig field; each field's comment is its --help text."""
    from facesense.core.config import TrainConfig, field_help, field_types

    helps, types = field_help(), field_types()
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, "--config", help="TOML or YAML file that sets any of "
                                                     "the options below (same names); the command line wins."))]
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if types[f.name] is bool else [flag]
        annotation = Optional[types[f.name]] if f.default is None else types[f.name]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(f.default, *decls, help=helps[f.name])))
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


@app.command("train")
@_train_options
def train_command(ctx: typer.Context, config: Optional[Path], **options):
    """Train on packed shards: selects on val (PublicTest), never reads test; checkpoints into --out."""
    from facesense.core.config import resolve_config

    # Only options typed on the command line override the config file (typer bundles its own
    # click, so compare ParameterSource by name).
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    cfg = None
    try:
        cfg = resolve_config(config, given)
        from facesense.train.loop import train

        train(cfg)
    except (FaceSenseError, ShardError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        if cfg is not None and (Path(cfg.out) / "last.pt").exists():
            fail("interrupted; rerun the same command with --resume to continue from last.pt", 130)
        fail("interrupted before the first checkpoint; nothing was saved", 130)


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by facesense train (best.pt or last.pt)."),
    data: Path = typer.Option(Path("data/shards"), "--data", help="Packed shard directory."),
    split: str = typer.Option("test", "--split", help="Split to evaluate: test (PrivateTest) or val (PublicTest)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where report.json, confusion_matrix_heatmap.png and roc_curves.png go "
                                       "(default: eval-<checkpoint name>-<split>/ beside the checkpoint)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report.json in --out that describes another checkpoint."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation: none; flip (average with the mirror image); crops (average 10 views: whole image + 4 corner crops zoomed 1.1x, each also mirrored)."),
    batch_size: int = typer.Option(512, "--batch-size", help="Images per batch."),
    loader: str = typer.Option("auto", "--loader", help="Data loader: auto, resident, dali or dataloader."),
    workers: int = typer.Option(2, "--workers", help="Loader worker processes (dataloader) or threads (dali)."),
    device: str = typer.Option("auto", "--device", help="Device: auto (cuda if available), cpu, cuda or cuda:N."),
):
    """Accuracy, macro OvR ROC AUC, weighted F1, per-class report and confusion matrix of a checkpoint."""
    from facesense.eval.metrics import evaluate_checkpoint

    try:
        evaluate_checkpoint(checkpoint, data, split, out, tta, batch_size, loader, workers, device, overwrite=overwrite)
    except (FaceSenseError, ShardError) as exc:
        fail(str(exc))


@app.command("predict")
def predict_command(
    sources: list[str] = typer.Argument(..., help="Image files (jpg, png, bmp, webp), folders (searched recursively, "
                                        "sorted) and video files (mp4, avi, mov, mkv)."),
    model: Path = typer.Option(..., "--model", help="A FaceSense checkpoint (.pt) or an exported .onnx."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Where predictions.jsonl (and annotated/) go."),
    detector: str = typer.Option("haar", "--detector", help="haar: OpenCV's frontal-face cascade (ships in the "
                                 "wheel); none: every picture is already a face crop."),
    min_face: int = typer.Option(48, "--min-face", help="Smallest face side, in source pixels, to look for."),
    margin: Optional[float] = typer.Option(None, "--margin", help="Crop margin around a detected box, fraction of its side "
                                 "per side (default 0: measured best, see README)."),
    save_annotated: bool = typer.Option(False, "--save-annotated", help="Also write images with boxes and "
                                        "'label 87%' drawn, and annotated MP4s, under OUT/annotated/."),
    vid_stride: int = typer.Option(1, "--vid-stride", help="Classify every Nth video frame."),
    batch_size: int = typer.Option(64, "--batch-size", help="Faces per model call."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda or cuda:N."),
):
    """Detect faces in photos, folders and videos and classify their expression: OUT/predictions.jsonl."""
    from facesense.infer.faces import DEFAULT_MARGIN
    from facesense.infer.predict import Options, predict, summary_lines

    opts = Options(detector=detector, min_face=min_face, margin=DEFAULT_MARGIN if margin is None else margin,
                   save_annotated=save_annotated, vid_stride=vid_stride, batch_size=batch_size, device=device)
    try:
        report = predict(sources, model, out, opts)
    except FaceSenseError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; predictions.jsonl was not written", 130)
    for line in summary_lines(report, out):
        typer.echo(line)
    if report.failed:
        fail(f"{len(report.failed)} of {report.sources} sources failed (errors above); the others are in "
             f"{out / 'predictions.jsonl'}")


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by facesense train (best.pt or last.pt)."),
    format: str = typer.Option(..., "--format", help="onnx or torchscript."),
    out: Path = typer.Option(..., "--out", help="File to write (e.g. model.onnx, model.ts)."),
):
    """Export the checkpoint's eval model (EMA weights if kept) with a dynamic batch size and its metadata."""
    from facesense.infer.export import export

    try:
        meta = export(checkpoint, format, out)
    except FaceSenseError as exc:
        fail(str(exc))
    typer.echo(f"wrote {out}: {format}, {meta['model']} ({meta['weights']} weights), input (N, {meta['channels']}, "
               f"{meta['img_size']}, {meta['img_size']}) normalised with mean {meta['norm_mean']} std "
               f"{meta['norm_std']}, classes {', '.join(meta['classes'])}")


@bench_app.command("pack")
def bench_pack(
    data: Path = typer.Option(Path("../shared/fer2013"), "--data", help="FER2013 image-folder root."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="fer2013.csv to time; default: one made from --data."),
    repeats: int = typer.Option(3, "--repeats", help="Timed repeats (median reported)."),
    json_path: Path = typer.Option(Path("benchmarks/results/pack-cpu.json"), "--json", help="Where to write results."),
):
    """Time pack on the folder and a CSV against a naive one-process PIL loop."""
    from benchmarks.bench_pack import run

    run(data, csv, repeats, json_path)


@bench_app.command("augment")
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

    try:
        run(device, [int(s) for s in _csv(sizes)], _csv(dtypes), channels, batch_size, dataset_size, warmup,
            repeats, iters, json_path)
    except ValueError as exc:
        fail(str(exc))


@bench_app.command("loader")
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
        fail(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        run(data, _csv(kinds), [int(s) for s in _csv(sizes)], batches, batch_size, split, dtype, channels,
            warmup, repeats, workers, device, json_path)
    except (ShardError, ValueError) as exc:
        fail(str(exc))


@bench_app.command("train")
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
    try:
        run(data, [int(s) for s in _csv(sizes)], _csv(variants), _csv(loaders), model, channels, batch_size,
            steps, warmup, repeats, device, json_path)
    except (ShardError, ValueError) as exc:
        fail(str(exc))


@bench_app.command("predict")
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

    try:
        run(model, data, batch_size, photos, repeats, video_frames, json_path)
    except (FaceSenseError, ShardError) as exc:
        fail(str(exc))


@bench_app.command("margin")
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

    try:
        margin_sweep(model, data, [float(m) for m in _csv(margins)], limit, json_path)
    except (FaceSenseError, ShardError) as exc:
        fail(str(exc))


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
