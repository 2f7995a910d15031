"""Face detection: which of predict's detection steps keep the faces, and what big photos do.

Run: .venv/bin/python -m benchmarks.bench_detect --faces 400 --json benchmarks/results/detect-cpu.json
(about two minutes on 2 cores; needs the FER2013 image folders at ../shared/fer2013).

recall: --faces FER2013 val (PublicTest) faces, classes interleaved, each upscaled 4x
(48 -> 192 px, bicubic) onto a mid-grey 640x480 canvas at a seeded random place, and the
same canvases dimmed to 35% (an underexposed photo, the case histogram equalisation is
meant for). Each is searched by OpenCV's frontal-face cascade with FaceSense's parameters
(scale 1.1, 5 neighbours, 48-px smallest face) four ways: on the picture as is
(minSize 48), histogram-equalised, shrunk first so that 48 px becomes the cascade's 24-px
window, shrunk and equalised (predict's detector up to this benchmark); and by predict's
detector itself (`faces.HaarDetector`). A face is found when a box overlaps its 192-px
square with IoU >= 0.5; any other box is false.

big: scikit-image's astronaut at several sizes on a blurred-noise background in 6000x4000
(24 MP) and 8000x8000 pictures; faces found and false boxes, for the detector before
(shrink to min_face only, equalised, no suppression of nested boxes) and predict's now.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.env import ROOT, write_result

FER = ROOT.parent / "shared" / "fer2013"
CANVAS = (480, 640)  # (height, width) of a recall picture
FACE_SIDE = 192  # a 48-px FER face upscaled 4x
MIN_FACE, SCALE, NEIGHBOURS, WINDOW = 48, 1.1, 5, 24
# (long side, astronaut side) of the big pictures; the astronaut's face is 95/512 of its side.
BIG = ((6000, 600), (6000, 2000), (6000, 4000), (8000, 8000))


def fer_faces(n: int) -> list[np.ndarray]:
    """n val faces (48x48 gray), the seven classes interleaved; [] without the image folders."""
    import cv2

    from pipeline.classes import FER2013_CLASSES

    per_class = [sorted((FER / "test" / c).glob("PublicTest_*.jpg")) for c in FER2013_CLASSES]
    files = [f for k in range(n) for f in (files[k] for files in per_class if k < len(files))][:n]
    return [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]


def canvas(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The face upscaled onto a grey canvas at a random place, and its box."""
    import cv2

    h, w = CANVAS
    picture = np.full(CANVAS, 128, np.uint8)
    x, y = int(rng.integers(0, w - FACE_SIDE + 1)), int(rng.integers(0, h - FACE_SIDE + 1))
    picture[y:y + FACE_SIDE, x:x + FACE_SIDE] = cv2.resize(face, (FACE_SIDE, FACE_SIDE),
                                                           interpolation=cv2.INTER_CUBIC)
    return picture, (x, y, x + FACE_SIDE, y + FACE_SIDE)


def cascade_steps(shrink: bool, equalize: bool, max_side: int | None = None):
    """The cascade with FaceSense's parameters and the chosen steps, as a function gray -> boxes."""
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        f = WINDOW / MIN_FACE if shrink else 1.0
        if max_side:
            f = min(f, max_side / max(gray.shape))
        small = cv2.resize(gray, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) if f < 1 else gray
        if equalize:
            small = cv2.equalizeHist(small)
        side = WINDOW if shrink else MIN_FACE
        found = cascade.detectMultiScale(small, scaleFactor=SCALE, minNeighbors=NEIGHBOURS, minSize=(side, side))
        return [(int(x / f), int(y / f), int((x + bw) / f), int((y + bh) / f))
                for x, y, bw, bh in (found if len(found) else [])]

    return detect


def iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def score(detect, pictures: list) -> dict:
    """Faces found (a box with IoU >= 0.5), false boxes and ms per picture over (picture, box) pairs."""
    found = false = 0
    start = time.perf_counter()
    for picture, truth in pictures:
        boxes = detect(picture)
        hits = [b for b in boxes if iou(b, truth) >= 0.5]
        found += bool(hits)
        false += len(boxes) - len(hits)
    ms = (time.perf_counter() - start) / max(1, len(pictures)) * 1000
    return {"found": found, "of": len(pictures), "recall": found / max(1, len(pictures)), "false_boxes": false,
            "ms_per_picture": round(ms, 2)}


def methods() -> dict:
    from facesense.infer.faces import HaarDetector

    return {"cascade as is": cascade_steps(shrink=False, equalize=False),
            "equalize only": cascade_steps(shrink=False, equalize=True),
            "shrink only": cascade_steps(shrink=True, equalize=False),
            "shrink + equalize (before)": cascade_steps(shrink=True, equalize=True),
            "facesense predict (now)": HaarDetector(MIN_FACE)}


def big_pictures(seed: int = 0) -> list:
    """(picture, astronaut face box) in 24 MP and 64 MP pictures."""
    import cv2
    from skimage import data

    rng = np.random.default_rng(seed)
    astronaut = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    pictures = []
    for long_side, side in BIG:
        h, w = (4000, long_side) if long_side == 6000 else (long_side, long_side)
        noise = rng.integers(60, 200, (h // 8, w // 8), dtype=np.uint8)
        picture = cv2.resize(cv2.GaussianBlur(noise, (0, 0), 2), (w, h))
        side = min(side, h)
        x = int(rng.integers(0, w - side + 1))
        picture[h - side:, x:x + side] = cv2.resize(astronaut, (side, side), interpolation=cv2.INTER_CUBIC)
        k = side / 512
        cx, cy, half = x + 225 * k, h - side + 115 * k, 95 * k / 2
        pictures.append((picture, (cx - half, cy - half, cx + half, cy + half)))
    return pictures


def run(n_faces: int, json_path: Path, big: bool = True) -> dict:
    import cv2

    from facesense.infer.faces import MAX_DETECT_SIDE, HaarDetector

    faces = fer_faces(n_faces)
    if len(faces) < n_faces:
        raise SystemExit(f"needs {n_faces} FER2013 val faces under {FER}/test/<class>/PublicTest_*.jpg")
    rng = np.random.default_rng(0)
    plain = [canvas(face, rng) for face in faces]
    dim = [((picture * 0.35).astype(np.uint8), box) for picture, box in plain]
    results = []
    for name, detect in methods().items():
        for pictures_name, pictures in (("fer192-grey", plain), ("fer192-grey-dim35", dim)):
            row = {"pictures": pictures_name, "method": name, **score(detect, pictures)}
            results.append(row)
            print(f"{pictures_name:18s} {name:28s} {row['found']:4d} of {row['of']}  false {row['false_boxes']:3d}  "
                  f"{row['ms_per_picture']:6.1f} ms", flush=True)
    big_rows = []
    if big:
        before = cascade_steps(shrink=True, equalize=True)
        for picture, truth in big_pictures():
            for name, detect in (("before", before), ("now", HaarDetector(MIN_FACE))):
                row = {"size": [picture.shape[1], picture.shape[0]], "face_side": round(truth[2] - truth[0]),
                       "method": name, **score(detect, [(picture, truth)])}
                big_rows.append(row)
                print(f"big {row['size']} face {row['face_side']:4d} px {name:7s} found {row['found']} "
                      f"false {row['false_boxes']:2d}  {row['ms_per_picture'] / 1000:.1f} s", flush=True)
    payload = {"benchmark": "detect", "results": results, "big": big_rows,
               "config": {"faces": n_faces, "canvas": list(CANVAS[::-1]), "face_side": FACE_SIDE,
                          "min_face": MIN_FACE, "scale_factor": SCALE, "min_neighbors": NEIGHBOURS,
                          "max_detect_side": MAX_DETECT_SIDE, "iou": 0.5, "opencv_threads": cv2.getNumThreads()}}
    write_result(json_path, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=400, help="FER2013 val faces to place on canvases.")
    parser.add_argument("--no-big", action="store_true", help="Skip the 24/64 MP pictures (the slow part).")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/detect-cpu.json"))
    args = parser.parse_args(argv)
    run(args.faces, args.json, big=not args.no_big)


if __name__ == "__main__":
    main()
