"""Inference: how fast `facesense predict` is, and which crop margin makes detected faces look like FER2013's.

Run: facesense bench predict --model model/best.pt --json benchmarks/results/predict-cpu.json
     facesense bench margin  --model model/best.pt --data data/shards --json benchmarks/results/margin-cpu.json

bench predict
* `classify`: faces/s of the classifier alone on real 48x48 val faces, at --batch-size,
  PyTorch (the checkpoint) and onnxruntime (an export of it made here), preprocessing
  (`faces.model_input`) included, warm-up first, median of --repeats;
* `photos`: pictures/s through detection, crop and classification, one photo at a time
  (decode excluded: pictures already in memory), on 640x480 photos of one real face
  (scikit-image's astronaut at a random size and place); the cascade's misses and false
  positives show in `faces_found_per_photo`;
* `video`: frames/s of `facesense predict` itself on a 640x480 MP4 made here (decode,
  detection, batching, JSONL), the figure a user sees.

bench margin: every val face upscaled 3x (48 -> 144 px) onto a mid-grey 320x320 canvas,
found by the Haar detector (`faces.HaarDetector`), cropped with each margin in --margins,
classified (a negative margin crops inside the box); accuracy on the faces found, next to the accuracy of the same faces as
packed (the ceiling). The margin whose crops score best is the framing closest to
FER2013's.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.env import BadOption, at_least, median_time, write_result
from facesense.core.errors import FaceSenseError

MIN_MARGIN = -0.5  # a crop grows by margin x side on each side: at -0.5 or below nothing is left


def _faces(data: Path | None, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real val faces (uint8 N x 48 x 48) and labels; made-up faces when there are no shards."""
    rng = np.random.default_rng(seed)
    if data is not None and (Path(data) / "manifest.json").is_file():
        from pipeline.shards import read_split

        split = read_split(data, "val")
        idx = rng.choice(len(split.labels), size=min(n, len(split.labels)), replace=False)
        return split.images[np.sort(idx)], split.labels[np.sort(idx)].astype(np.int64)
    return rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), rng.integers(0, 7, n)


def _median_rate(fn, items: int, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    median, times = median_time(fn, repeats, warmup)
    return items / median, times


def _photo(portrait: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 640x480 BGR photo with one real face: the portrait at a random size and place on a blurred background."""
    import cv2

    canvas = cv2.GaussianBlur(rng.integers(60, 200, (480, 640, 3), dtype=np.uint8), (0, 0), 8)
    side = int(rng.integers(400, 481))
    x = int(rng.integers(0, 640 - side + 1))
    canvas[480 - side:, x:x + side] = cv2.resize(portrait, (side, side), interpolation=cv2.INTER_AREA)
    return canvas


def _portrait() -> np.ndarray:
    """scikit-image's astronaut (512x512, one real face), BGR."""
    import cv2
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def check_model(model: Path) -> None:
    if not Path(model).is_file():
        raise BadOption(f"--model {model}: no such checkpoint (train one, or pass a .pt file)")


def run(model: Path, data: Path | None, batch_size: int, photos: int, repeats: int, video_frames: int,
        json_path: Path) -> dict:
    at_least(1, batch_size=batch_size, photos=photos, video_frames=video_frames, repeats=repeats)
    check_model(model)
    import cv2
    import torch
    from rich.console import Console

    from facesense.infer.classifier import OnnxClassifier, load_classifier
    from facesense.infer.export import export
    from facesense.infer.faces import HaarDetector, find_faces, to_gray
    from facesense.infer.predict import PredictOptions, predict

    console = Console()
    faces, _ = _faces(data, batch_size)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export(model, "onnx", onnx_path)
        backends = {"pytorch": load_classifier(model, "cpu"), "onnxruntime": OnnxClassifier(onnx_path, "cpu")}
        for name, clf in backends.items():
            rate, times = _median_rate(lambda: clf.probs(faces), len(faces), repeats, warmup=2)
            results.append({"mode": "classify", "backend": name, "batch_size": len(faces),
                            "img_size": clf.pre.img_size, "faces_per_s": rate, "times_s": times})
            console.print(f"classify {name:12s} batch {len(faces)}: {rate:,.0f} faces/s")

        rng = np.random.default_rng(0)
        portrait = _portrait()
        pictures = [_photo(portrait, rng) for _ in range(photos)]
        detector = HaarDetector(48)
        found = [len(find_faces(to_gray(p), detector)[0]) for p in pictures]
        for name, clf in backends.items():
            def one_by_one():
                for picture in pictures:
                    boxes, crops = find_faces(to_gray(picture), detector)
                    if len(crops):
                        clf.probs(crops)

            rate, times = _median_rate(one_by_one, len(pictures), repeats)
            results.append({"mode": "photos", "backend": name, "size": [640, 480], "photos": len(pictures),
                            "faces_found_per_photo": statistics.mean(found), "photos_per_s": rate,
                            "times_s": times})
            console.print(f"photos   {name:12s} 640x480 detect+classify: {rate:,.1f} photos/s "
                          f"({statistics.mean(found):.2f} faces found per photo)")

        video = Path(tmp) / "clip.mp4"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
        for i in range(video_frames):
            writer.write(pictures[i % len(pictures)])
        writer.release()
        for name, path in (("pytorch", model), ("onnxruntime", onnx_path)):
            out = Path(tmp) / f"out-{name}"
            runs = []
            for _ in range(repeats):
                opts = PredictOptions(device="cpu", batch_size=64, overwrite=True)  # each repeat writes the same --out
                summary = predict([str(video)], path, out, opts, progress=False)
                runs.append(summary.frames / summary.seconds)
            rate = statistics.median(runs)
            results.append({"mode": "video", "backend": name, "size": [640, 480], "frames": video_frames,
                            "faces": summary.faces, "frames_per_s": rate, "runs_frames_per_s": runs})
            console.print(f"video    {name:12s} 640x480 facesense predict: {rate:,.1f} frames/s")
        results += api_and_tracking(model, onnx_path, faces, pictures, video_frames, repeats, console)
    payload = {"benchmark": "predict", "results": results,
               "config": {"model": str(model), "data": str(data) if data else None, "batch_size": batch_size,
                          "photos": photos, "repeats": repeats, "video_frames": video_frames,
                          "torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
                          # other work on the machine while timing (e.g. a training run): 1-minute load
                          "load_average_1min_after": os.getloadavg()[0]}}
    write_result(json_path, payload)
    return payload


def api_and_tracking(model: Path, onnx_path: Path, faces: np.ndarray, pictures: list, video_frames: int,
                     repeats: int, console) -> list[dict]:
    """The Python API in-process (`Recognizer`, numpy in): faces/s of `classify` at the batch size and of
    `rec(frame)`; and video tracking's cost: frames/s of detect + classify per frame without tracks, then
    the same frames through `rec.video` (tracks and smoothing) -- median of repeats each, interleaved."""
    from facesense.infer.recognizer import Recognizer

    rows = []
    for name, path in (("onnxruntime", onnx_path), ("pytorch", model)):  # the checkpoint's Recognizer stays
        rec = Recognizer(path, "cpu", batch_size=len(faces))
        rate, times = _median_rate(lambda: rec.classify(faces), len(faces), repeats, warmup=2)
        rows.append({"mode": "api-classify", "backend": name, "batch_size": len(faces), "faces_per_s": rate,
                     "times_s": times})
        console.print(f"api      classify {name:12s} batch {len(faces)}: {rate:,.0f} faces/s")
    found = sum(len(rec(p)) for p in pictures)
    rate, times = _median_rate(lambda: [rec(p) for p in pictures], len(pictures), repeats)
    rows.append({"mode": "api-frames", "backend": "pytorch", "size": [640, 480], "frames": len(pictures),
                 "faces_per_s": rate * found / len(pictures), "frames_per_s": rate, "times_s": times})
    console.print(f"api      rec(frame) 640x480: {rate:,.1f} frames/s, {rate * found / len(pictures):,.1f} faces/s")
    frames = [pictures[i % len(pictures)] for i in range(video_frames)]

    def untracked():
        for f in frames:
            rec.classify(rec.detect(f)[1])

    runs = {"without": [], "with": []}
    for _ in range(repeats):  # interleaved: a slower stretch of the machine hits both alike
        runs["without"].append(len(frames) / median_time(untracked, 1, 0)[0])
        runs["with"].append(len(frames) / median_time(lambda: list(rec.video(frames, smooth=5)), 1, 0)[0])
    without, with_ = statistics.median(runs["without"]), statistics.median(runs["with"])
    cost = 1 - with_ / without
    rows.append({"mode": "tracking", "backend": "pytorch", "size": [640, 480], "frames": len(frames), "smooth": 5,
                 "frames_per_s_without_tracks": without, "frames_per_s_with_tracks": with_, "cost": cost,
                 "runs_frames_per_s": runs})
    console.print(f"tracking 640x480 frames/s without {without:,.1f}, with tracks + smoothing {with_:,.1f} "
                  f"(cost {cost:+.1%})")
    return rows


def margin_sweep(model: Path, data: Path, margins: list[float], limit: int, json_path: Path) -> dict:
    if not margins:
        raise BadOption("--margins: give at least one margin, e.g. 0,0.1")
    low = [m for m in margins if not m > MIN_MARGIN]
    if low:
        raise BadOption(f"--margins {low[0]}: must be above {MIN_MARGIN} (the crop would be empty)")
    at_least(1, limit=limit)
    check_model(model)
    from pipeline.shards import load_manifest

    load_manifest(data)  # the val faces must be real ones (ShardError, one line, where there are none)
    import cv2
    from rich.console import Console

    from facesense.infer.classifier import load_classifier
    from facesense.infer.faces import HaarDetector, resize_face, square_crop

    console = Console()
    faces, labels = _faces(data, limit)
    clf = load_classifier(model, "cpu")
    detector = HaarDetector(48)
    crops = {m: [] for m in margins}
    found, sides, offsets = [], [], []
    for i, face in enumerate(faces):
        canvas = np.full((320, 320), 128, np.uint8)
        canvas[88:232, 88:232] = cv2.resize(face, (144, 144), interpolation=cv2.INTER_CUBIC)
        boxes = detector(canvas)
        if not boxes:
            continue
        found.append(i)
        x1, y1, x2, y2 = boxes[0]
        sides.append((x2 - x1) / 144)  # box side / the face picture's side
        offsets.append(((x1 + x2) / 2 - 160) / 144 * 48)  # box centre - picture centre, in 48-px face pixels
        offsets.append(((y1 + y2) / 2 - 160) / 144 * 48)
        for m in margins:
            crops[m].append(resize_face(square_crop(canvas, boxes[0], m)))
    if not found:
        raise FaceSenseError(f"the detector found none of the {len(faces)} faces: no margin to compare")
    found = np.array(found)
    y = labels[found]

    def accuracy(batch: np.ndarray) -> float:
        preds = np.concatenate([clf.probs(batch[k:k + 256]).argmax(1) for k in range(0, len(batch), 256)])
        return float((preds == y).mean())

    ceiling = accuracy(faces[found])
    rows = []
    for m in margins:
        acc = accuracy(np.stack(crops[m]))
        rows.append({"margin": m, "accuracy": acc})
        console.print(f"margin {m:.2f}: accuracy {acc:.4f}  (same faces as packed: {ceiling:.4f})")
    best = max(rows, key=lambda r: r["accuracy"])
    payload = {"benchmark": "margin", "faces": int(len(faces)), "found": int(len(found)),
               "detection_rate": len(found) / len(faces), "packed_accuracy_of_found": ceiling,
               "box_side_over_face_side": {"mean": float(np.mean(sides)), "median": float(np.median(sides))},
               "box_centre_offset_px48": {"x_mean": float(np.mean(offsets[0::2])),
                                          "y_mean": float(np.mean(offsets[1::2]))},
               "results": rows, "best_margin": best["margin"],
               "config": {"model": str(model), "data": str(data), "canvas": 320, "face_side": 144,
                          "detector": "haar", "min_face": 48}}
    console.print(f"found {len(found)} of {len(faces)} faces; box side / face side: median {np.median(sides):.3f}; "
                  f"best margin {best['margin']}")
    write_result(json_path, payload)
    return payload
