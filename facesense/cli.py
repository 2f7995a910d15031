"""The `facesense` command line: pack, verify, train, eval, predict, export, bench.

The composition root: each command turns its options into a call of the library and prints
the result. Errors are handled in one place (`_Commands.invoke`): any FaceSenseError a
command raises (bad option, data, checkpoint; pipeline's pack and shard errors included)
becomes `error: <message>` and its exit code, and Ctrl-C (or SIGTERM, which `main` turns
into the same KeyboardInterrupt so that every writer's cleanup runs) becomes the command's
own "interrupted; ..." line and exit code 130. No traceback for anything a user can cause.
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from benchmarks.cli import app as bench_app
from facesense.core.errors import FaceSenseError

INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


class _Commands(TyperGroup):
    """The root command group: the one place where user errors and interrupts become one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (FaceSenseError, KeyboardInterrupt) as exc:
            if isinstance(exc, FaceSenseError):
                message, code = str(exc), exc.exit_code
            else:  # the running command says what an interrupt leaves behind (ctx.meta, see _on_interrupt)
                message, code = ctx.meta.get("interrupted", lambda: "interrupted")(), INTERRUPTED
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from None


def _on_interrupt(ctx: typer.Context, message) -> None:
    """What the error line says if this command is interrupted: a string, or a callable made at that time."""
    ctx.meta["interrupted"] = message if callable(message) else lambda: message


app = typer.Typer(cls=_Commands, help="FaceSense: fast, honest facial-expression training on FER2013.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(bench_app, name="bench")  # the benchmarks' own typer app (benchmarks/cli.py)


@app.command()
def pack(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="The source: FER2013's fer2013.csv or image folders (train/, test/); an "
                               "image-folder data set SRC/<train|val|test>/<class>/*; or RAF-DB's basic layout "
                               "(SRC/EmoLabel/list_patition_label.txt + SRC/Image/aligned/)."),
    out: Path = typer.Option(Path("data/shards"), "--out", "-o", help="Output directory for shards + manifest.json."),
    format: str = typer.Option("auto", "--format", help="Source format: auto (from SRC: a file is the CSV, a folder "
                               "with EmoLabel/ is RAF-DB, else image folders), folders (= imagefolder), csv or rafdb."),
    store: str = typer.Option("auto", "--store", help="raw: uint8 pixels, one size per split (decoded once, kept "
                              "in memory by the loaders); encoded: each file's bytes unchanged (CSV rows as lossless "
                              "PNG), decoded by the loaders per batch; auto: raw when every image has one size and "
                              "the largest split is <= 1 GiB decoded, else encoded (the manifest says why)."),
    size: Optional[int] = typer.Option(None, "--size", help="Raw storage: resize every image to NxN (bilinear). "
                                       "Without it every image must have one size."),
    channels: Optional[int] = typer.Option(None, "--channels", help="1 (gray, ITU-R 601 luma) or 3 (RGB). Default: "
                                           "the source's own: gray for FER2013, RGB for RAF-DB, image folders: RGB "
                                           "if any image is colour."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Image folders: class names in label order, "
                                          "comma-separated (a,b,c). Needed unless the folder names are FER2013's 7 "
                                          "or FER+'s 8 classes; numbered folders (AffectNet) are --classes by index "
                                          "(folder 0 is the first name)."),
    raf_images: Optional[str] = typer.Option(None, "--raf-images", help="RAF-DB: aligned (Image/aligned/"
                                             "<name>_aligned.jpg, 100x100 faces; the default) or original "
                                             "(Image/original/<name>.jpg)."),
    ferplus: Optional[Path] = typer.Option(None, "--ferplus", help="fer2013new.csv: relabel the CSV source with FER+ "
                                           "majority votes (8 classes) and keep every image's 10 vote counts."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of train used as val (stratified, "
                                       "seeded) when the source has no val images (no PublicTest, no val/ folder)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the val slice and the shuffled shard order."),
    shard_size: int = typer.Option(8192, "--shard-size", help="Images per shard at most."),
    workers: int = typer.Option(0, "--workers", help="Decoding processes (0 = all cores)."),
    resize: bool = typer.Option(False, "--resize", help="Resize images that are not 48x48 to 48x48 (= --size 48)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad images/rows (listed in the manifest) instead of failing."),
    dedupe: bool = typer.Option(False, "--dedupe", help="Drop train images that duplicate val/test images, and near-blank "
                                "train images (encoded packs compare file bytes)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when DIR is up to date."),
):
    """Pack a face data set once into verified HDF5 shards (atomic; does nothing if up to date)."""
    from pipeline.imagefolders import parse_classes
    from pipeline.pack import PackOptions, pack as run_pack

    opts = PackOptions(format=format, val_fraction=val_fraction, seed=seed, shard_size=shard_size,
                       resize=resize, skip_bad=skip_bad, dedupe=dedupe,
                       ferplus=str(ferplus.resolve()) if ferplus else None, store=store, size=size,
                       channels=channels, classes=parse_classes(classes), raf_images=raf_images)
    _on_interrupt(ctx, "interrupted; nothing was written")
    manifest, built = run_pack(src, out, opts, workers=workers or os.cpu_count(), force=force)
    if not built:
        typer.echo(f"{out}: up to date with {src} (nothing to do; --force rebuilds)")
        return
    counts = ", ".join(f"{s} {e['count']}" for s, e in manifest["splits"].items())
    dup = manifest["duplicates"]["summary"]
    train = manifest["splits"]["train"]
    shape = "x".join(map(str, train["image_shape"])) if train["image_shape"] else "mixed sizes"
    typer.echo(f"packed {out}: {counts}; {len(manifest['classes'])} classes; storage {train['storage']} "
               f"({shape}, {'RGB' if train['channels'] == 3 else 'gray'}"
               f"{', votes' if manifest['votes'] else ''}; {manifest['storage']['why'].split(':')[0]}); "
               f"{dup['groups']} duplicate groups ({dup['cross_split_groups']} across splits, "
               f"{dup['conflicting_label_groups']} with conflicting labels), {dup['near_blank']} near-blank"
               + (f"; skipped {len(manifest['skipped'])} bad items" if manifest["skipped"] else ""))


@app.command()
def verify(data: Path = typer.Argument(..., help="Shard directory written by facesense pack.")):
    """Re-hash every shard against manifest.json and check shapes, dtypes and labels."""
    from pipeline.shards import verify as run_verify

    total = run_verify(data)
    typer.echo(f"{data}: OK ({total} images)")


def _train_options(func):
    """Give `func` one option per TrainConfig field, with the field's help text.

    typer reads a command's options from its signature, and inspect's documented `__signature__`
    hook lets that signature be TrainConfig itself: no option can drift from the config (typer
    has no public way to build options from a dataclass; its click is private).
    """
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


class _TrainCommand(TyperCommand):
    """`--resume` alone means `--resume yes` (typer has no options with an optional value)."""

    def parse_args(self, ctx, args):
        from facesense.core.config import FLAG_VALUES

        given = list(args)
        for name, implied in FLAG_VALUES.items():
            flag = "--" + name.replace("_", "-")
            for i in reversed([i for i, arg in enumerate(given) if arg == flag]):
                if i + 1 == len(given) or given[i + 1].startswith("-"):
                    given.insert(i + 1, implied)
        return super().parse_args(ctx, given)


@app.command("train", cls=_TrainCommand)
@_train_options
def train_command(ctx: typer.Context, config: Optional[Path], **options):
    """Train on packed shards: selects on val (PublicTest), never reads test; checkpoints into --out."""
    from facesense.core.config import resolve_config

    # Only options typed on the command line override the config file (typer bundles its own
    # click, so compare ParameterSource by name).
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    cfg = resolve_config(config, given)
    _on_interrupt(ctx, lambda: "interrupted; rerun the same command with --resume to continue from last.pt"
                  if (Path(cfg.out) / "last.pt").exists() else
                  "interrupted before the first checkpoint; nothing was saved")
    from facesense.train.loop import train

    train(cfg)


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
    loader: str = typer.Option("auto", "--loader", help="Data loader: auto, resident, stream, dali or dataloader "
                               "(as facesense train --loader)."),
    workers: int = typer.Option(2, "--workers", help="Loader worker processes (dataloader) or threads (dali)."),
    device: str = typer.Option("auto", "--device", help="Device: auto (cuda if available), cpu, cuda or cuda:N."),
):
    """Accuracy, macro OvR ROC AUC, weighted F1, per-class report and confusion matrix of a checkpoint."""
    from facesense.eval.report import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, data, split, out, tta, batch_size, loader, workers, device, overwrite=overwrite)


@app.command("predict")
def predict_command(
    ctx: typer.Context,
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run's predictions.jsonl in OUT "
                                   "and delete its annotated pictures and videos (nothing else)."),
    smooth: int = typer.Option(1, "--smooth", help="Label each video track from its last N sampled frames' "
                               "mean probabilities (1: each frame's own); raw probs stay in the output."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="Read at most N sampled frames per "
                                             "video, camera or stream."),
    show: bool = typer.Option(False, "--show", help="Show annotated frames in a window (needs a display)."),
):
    """Detect faces in photos, folders, videos, cameras (0) and rtsp/http streams and classify their expression:
    OUT/predictions.jsonl (+ predictions.meta.json)."""
    from facesense.infer.faces import DEFAULT_MARGIN
    from facesense.infer.predict import PredictOptions, predict, summary_lines

    opts = PredictOptions(detector=detector, min_face=min_face, margin=DEFAULT_MARGIN if margin is None else margin,
                          save_annotated=save_annotated, vid_stride=vid_stride, batch_size=batch_size, device=device,
                          overwrite=overwrite, smooth=smooth, max_frames=max_frames, show=show)
    _on_interrupt(ctx, "interrupted; predictions.jsonl was not written")
    summary = predict(sources, model, out, opts)
    for line in summary_lines(summary, out):
        typer.echo(line)
    if summary.failed:
        raise FaceSenseError(f"{len(summary.failed)} of {summary.sources} sources failed (errors above); the others "
                             f"are in {out / 'predictions.jsonl'}")


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by facesense train (best.pt or last.pt)."),
    format: str = typer.Option(..., "--format", help="onnx or torchscript."),
    out: Path = typer.Option(..., "--out", help="File to write (e.g. model.onnx, model.ts)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow an --out that is the checkpoint itself or "
                                   "another FaceSense checkpoint (refused otherwise: it would be lost)."),
):
    """Export the checkpoint's eval model (EMA weights if kept) with a dynamic batch size and its metadata."""
    from facesense.infer.export import export

    meta = export(checkpoint, format, out, overwrite=overwrite)
    height, width = meta["source_shape"]
    typer.echo(f"wrote {out}: {format}, {meta['model']} ({meta['weights']} weights), input (N, {meta['channels']}, "
               f"{meta['img_size']}, {meta['img_size']}) normalised with mean {meta['norm_mean']} std "
               f"{meta['norm_std']}, from {height}x{width} {'gray' if meta['source_channels'] == 1 else 'RGB'} "
               f"faces, classes {', '.join(meta['classes'])}")


def main() -> None:
    from pipeline.interrupts import install_signal_policy

    install_signal_policy()  # SIGTERM -> KeyboardInterrupt, as Ctrl-C: partial outputs are cleaned up
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
