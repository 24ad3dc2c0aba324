#!/usr/bin/env python3
"""Quantise the prepared f32 YuNet and SFace to int8 (QDQ), calibrated on faces.

Calibration data come only from the bundled sample photos (data/samples), each
turned into seeded variants (horizontal flip, a window of the photo so that
faces come out cut off at its edge, scale, brightness, contrast, Gaussian blur,
JPEG re-compression; numpy PCG64 seeded, Pillow for the image operations),
never the unmodified photo:

  YuNet: whole frames, letterboxed into 640x640 exactly as facematch does
         (shrunk to fit when larger, padded right and bottom), BGR 0..255.
  SFace: every face the f32 YuNet finds in those frames, aligned to the ArcFace
         112x112 template (Umeyama similarity, bilinear), RGB 0..255.

Then every BatchNormalization is folded into its Conv/Gemm (`fold_batchnorm`:
ORT's pre-processing leaves them, and quantising before the per-channel BN
scale costs accuracy), and ONNX Runtime's own tool runs: `quant_pre_process`
(shape inference + ORT's basic graph optimisation), `quantize_static` with
QuantFormat.QDQ, per-channel int8 weights, uint8 activations, and the calibration method and node exclusions
chosen by measurement (docs/MODELS.md; `--sweep` re-runs that measurement). SFace also gets its activation
channels equalised before quantisation (`equalize`), keeps its first two convs (conv_1, conv_2's depthwise)
in f32, and gets an empirical bias correction afterwards (`bias_correct`: each quantised conv's per-channel
mean error against f32 on the calibration crops, taken off its int32 bias).
The same pinned onnxruntime/onnx/numpy/Pillow versions give byte-identical
files: scripts/setup.sh checks their sha256.

usage:
  .venv/bin/python scripts/quantize_models.py [--models models] [--samples data/samples]
      writes models/yunet-int8.onnx and models/sface-int8.onnx (or into --out DIR)
  .venv/bin/python scripts/quantize_models.py --sweep
      the configurations in SFACE_SWEEP, fidelity of each against f32 (JSON lines):
      cosine to f32 on the samples' faces and on held-out variants (another seed): held_out with the
      edge windows of the calibration set, held_out_whole without them (the first sets' stream)
"""
import argparse
import glob
import io
import json
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper
from PIL import Image, ImageFilter, ImageOps

import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20
VARIANTS = 6  # augmented variants per sample photo (10 measured no better)
DET = 640
ARCFACE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
                   dtype=np.float64)

# What was kept (docs/MODELS.md has the measurements behind each choice).
SFACE_PLAN = {"method": "percentile", "percentile": 99.995, "exclude": ["conv_1_conv2d", "conv_2_dw_conv2d"],
              "equalize": 0.5, "bias_correct": True}
YUNET_PLAN = {"method": "minmax", "exclude": []}
# What --sweep measures for SFace (docs/MODELS.md). The first six, the method x BN-folding grid, now run on the
# calibration set with edge windows; the docs' rows for them were measured before the windows were added.
_EARLY = ["conv_1_conv2d", "conv_2_dw_conv2d"]
_P9999_BC = {"method": "percentile", "percentile": 99.99, "exclude": _EARLY, "bias_correct": True}
SFACE_SWEEP = ([{"method": m, "fold": f, "exclude": []} for m in ("minmax", "percentile", "entropy") for f in (False, True)]
               + [{"method": "percentile", "percentile": 99.99, "exclude": [], "bias_correct": True},
                  {"method": "percentile", "percentile": 99.99, "exclude": _EARLY},
                  {"method": "percentile", "percentile": 99.99, "exclude": ["conv_1_conv2d"], "bias_correct": True},
                  {"method": "percentile", "percentile": 99.99, "exclude": [], "bias_correct": True,
                   "u16": ["conv_1_conv2d", "conv_1_relu"]},
                  {"method": "percentile", "percentile": 99.99, "exclude": [], "bias_correct": True,
                   "u16": ["conv_1_conv2d", "conv_1_relu", "conv_2_dw_conv2d", "conv_2_dw_relu"]},
                  {**_P9999_BC, "exclude": _EARLY + ["conv_2_conv2d"]},
                  {**_P9999_BC, "exclude": _EARLY + ["conv_2_conv2d", "conv_3_dw_conv2d"]},
                  _P9999_BC, {**_P9999_BC, "percentile": 99.995}, {**_P9999_BC, "percentile": 99.995, "bias_correct": False},
                  {**_P9999_BC, "equalize": 0.0}, {**_P9999_BC, "equalize": 0.0, "percentile": 99.995},
                  {**SFACE_PLAN, "percentile": 99.99}, {**SFACE_PLAN, "bias_correct": False},
                  {**SFACE_PLAN, "exclude": []}, {**SFACE_PLAN, "equalize": 1.0},
                  SFACE_PLAN])


# --- images -------------------------------------------------------------------

def load_rgb(path):
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def variants(img, rng, n, windows=True):
    """n seeded variants of a PIL RGB image (windows=False: never cut, the random stream of the first sets)."""
    out = []
    for _ in range(n):
        v = img
        if rng.random() < 0.5:
            v = ImageOps.mirror(v)
        if windows and rng.random() < 0.35:
            # A window of the photo: faces near its edge come out cut off, as in partial-face photos.
            fw, fh = float(rng.uniform(0.55, 0.9)), float(rng.uniform(0.55, 0.9))
            x0, y0 = float(rng.uniform(0, 1 - fw)), float(rng.uniform(0, 1 - fh))
            v = v.crop((round(x0 * v.width), round(y0 * v.height), round((x0 + fw) * v.width), round((y0 + fh) * v.height)))
        s = float(rng.uniform(0.6, 1.15))
        v = v.resize((max(16, round(v.width * s)), max(16, round(v.height * s))), Image.BILINEAR)
        a = np.asarray(v, dtype=np.float32)
        contrast, bright = float(rng.uniform(0.7, 1.3)), float(rng.uniform(-30, 30))
        a = np.clip((a - 128.0) * contrast + 128.0 + bright, 0, 255).astype(np.uint8)
        v = Image.fromarray(a)
        if rng.random() < 0.4:
            v = v.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.8))))
        if rng.random() < 0.6:
            buf = io.BytesIO()
            v.save(buf, format="JPEG", quality=int(rng.integers(35, 90)))
            buf.seek(0)
            v = Image.open(buf).convert("RGB")
        out.append(v)
    return out


def letterbox(img):
    """PIL RGB -> (1,3,640,640) BGR float32, scale factors (rx, ry) back to the image."""
    w, h = img.size
    s = min(1.0, DET / w, DET / h)
    rw, rh = min(DET, max(1, round(w * s))), min(DET, max(1, round(h * s)))
    r = img if (rw, rh) == (w, h) else img.resize((rw, rh), Image.BILINEAR)
    canvas = np.zeros((DET, DET, 3), dtype=np.float32)
    canvas[:rh, :rw] = np.asarray(r, dtype=np.float32)
    return canvas[:, :, ::-1].transpose(2, 0, 1)[None].copy(), w / rw, h / rh


# --- detection (numpy decode of YuNet outputs) --------------------------------

def session_options():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def session(path):
    return ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])


def detect(sess, tensor, rx, ry, thresh=0.6, nms=0.3):
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"input": tensor})))
    rows = []
    for st in (8, 16, 32):
        g = DET // st
        cls, obj = outs[f"cls_{st}"][0, :, 0], outs[f"obj_{st}"][0, :, 0]
        score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
        idx = np.nonzero(score > thresh)[0]
        b, k = outs[f"bbox_{st}"][0], outs[f"kps_{st}"][0]
        for i in idx:
            col, row = i % g, i // g
            cx, cy = (col + b[i, 0]) * st, (row + b[i, 1]) * st
            w, h = np.exp(b[i, 2]) * st, np.exp(b[i, 3]) * st
            lm = [((k[i, 2 * j] + col) * st, (k[i, 2 * j + 1] + row) * st) for j in range(5)]
            rows.append((float(score[i]), [cx - w / 2, cy - h / 2, w, h], lm))
    rows.sort(key=lambda r: -r[0])
    kept = []
    for r in rows:
        if all(iou(r[1], q[1]) <= nms for q in kept):
            kept.append(r)
    faces = []
    for score, (x, y, w, h), lm in kept:
        lm = np.array([((px + 0.5) * rx - 0.5, (py + 0.5) * ry - 0.5) for px, py in lm])
        faces.append({"score": score, "bbox": [(x + 0.5) * rx - 0.5, (y + 0.5) * ry - 0.5, w * rx, h * ry], "landmarks": lm})
    return faces


def iou(a, b):
    ix = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    iy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# --- alignment ----------------------------------------------------------------

def umeyama(src, dst):
    """Similarity (2x3) mapping src points to dst points, least squares."""
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / s.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = md - scale * r @ ms
    return m


def align(img_arr, landmarks):
    """RGB uint8 HxWx3, 5 landmarks -> (3,112,112) float32 RGB 0..255 (bilinear, black outside)."""
    m = umeyama(landmarks, ARCFACE)
    a = np.vstack([m, [0, 0, 1]])
    inv = np.linalg.inv(a)
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    h, w = img_arr.shape[:2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    src = img_arr.astype(np.float64)

    def px(yy, xx):
        ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        v = src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        return v * ok[..., None]

    out = (px(y0, x0) * (1 - fx) * (1 - fy) + px(y0, x0 + 1) * fx * (1 - fy)
           + px(y0 + 1, x0) * (1 - fx) * fy + px(y0 + 1, x0 + 1) * fx * fy)
    return np.round(out).clip(0, 255).astype(np.float32).transpose(2, 0, 1)


# --- calibration sets -----------------------------------------------------------

def sample_paths(samples):
    paths = sorted(glob.glob(os.path.join(samples, "*.jpg")))
    if not paths:
        sys.exit(f"no sample photos in {samples}: run scripts/setup.sh")
    return paths


def calibration_sets(paths, yunet_f32, seed=SEED, n=VARIANTS, windows=True):
    """(frames for YuNet, aligned crops for SFace) from seeded variants of every photo."""
    rng = np.random.Generator(np.random.PCG64(seed))
    det = session(yunet_f32)
    frames, crops = [], []
    for p in paths:
        for v in variants(load_rgb(p), rng, n, windows):
            t, rx, ry = letterbox(v)
            frames.append(t)
            arr = np.asarray(v)
            for f in detect(det, t, rx, ry):
                crops.append(align(arr, f["landmarks"])[None])
    return frames, crops


class Reader(CalibrationDataReader):
    def __init__(self, name, tensors):
        self.name, self.tensors, self.i = name, tensors, 0

    def get_next(self):
        if self.i >= len(self.tensors):
            return None
        self.i += 1
        return {self.name: self.tensors[self.i - 1]}

    def rewind(self):
        self.i = 0


def fold_batchnorm(src, dst, into_gemm_input=True):
    """Fold every BatchNormalization into the Conv or Gemm next to it (and drop
    inference-time Dropout), in f32, before quantisation.

    ONNX Runtime's quantisation pre-processing leaves SFace's 29 BatchNormalization
    nodes alone, so QDQ quantises each conv's raw output per tensor and the
    per-channel BN scale is applied to already-rounded values: channels with a
    small range lose most of their precision. Folded, the BN scale goes into the
    per-channel int8 weights instead. Handled: Conv -> BN (into the conv's weights
    and bias); BN -> [Dropout] -> Flatten -> Gemm (into the Gemm's input columns);
    Gemm -> BN (into the Gemm's rows). Anything else is left as it is.
    """
    m = onnx.load(src)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name]).astype(np.float64)
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}

    def set_init(name, value):
        t = numpy_helper.from_array(value.astype(np.float32), name)
        if name in inits:
            inits[name].CopyFrom(t)
        else:
            g.initializer.append(t)
            inits[name] = g.initializer[-1]

    def bn_params(bn):
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (arr(x) for x in bn.input[1:5])
        sc = gamma / np.sqrt(var + eps)
        return sc, beta - mean * sc

    def rewire(old, new):
        for n in g.node:
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new
        for o in g.output:
            if o.name == old:
                o.name = new

    drop = []
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        prev = producer.get(bn.input[0])
        if prev is None or len(consumers.get(bn.input[0], [])) != 1:
            continue
        sc, sh = bn_params(bn)
        if prev.op_type == "Conv" and prev.input[1] in inits:
            w = arr(prev.input[1])
            b = arr(prev.input[2]) if len(prev.input) > 2 and prev.input[2] else np.zeros(w.shape[0])
            set_init(prev.input[1], w * sc[:, None, None, None])
            bias = prev.output[0] + "_folded_bias"
            set_init(bias, b * sc + sh)
            if len(prev.input) > 2:
                prev.input[2] = bias
            else:
                prev.input.append(bias)
        elif prev.op_type == "Gemm" and prev.input[1] in inits:
            trans_b = next((a.i for a in prev.attribute if a.name == "transB"), 0)
            w = arr(prev.input[1])  # (out, in) if transB else (in, out)
            b = arr(prev.input[2])
            set_init(prev.input[1], w * (sc[:, None] if trans_b else sc[None, :]))
            set_init(prev.input[2], b * sc + sh)
        elif into_gemm_input:
            # BN -> [Dropout] -> Flatten -> Gemm: scale the Gemm's input columns.
            chain = consumers.get(bn.output[0], [])
            nodes = []
            while len(chain) == 1 and chain[0].op_type in ("Dropout", "Flatten"):
                nodes.append(chain[0])
                chain = consumers.get(chain[0].output[0], [])
            if not (len(chain) == 1 and chain[0].op_type == "Gemm" and nodes and nodes[-1].op_type == "Flatten"):
                continue
            gemm = chain[0]
            trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
            w = arr(gemm.input[1])
            w_in = w.T if trans_b else w  # (in, out)
            per = w_in.shape[0] // sc.size  # flattened features per channel (NCHW: channel-major)
            s_in, t_in = np.repeat(sc, per), np.repeat(sh, per)
            b = arr(gemm.input[2]) + t_in @ w_in
            w_in = w_in * s_in[:, None]
            set_init(gemm.input[1], w_in.T if trans_b else w_in)
            set_init(gemm.input[2], b)
            for n in nodes:
                if n.op_type == "Dropout":
                    rewire(n.output[0], n.input[0])
                    drop.append(n)
        else:
            continue
        if bn.output[0] in {o.name for o in g.output}:
            prev.output[0] = bn.output[0]  # keep the graph's output name (SFace: fc1)
        else:
            rewire(bn.output[0], bn.input[0])
        drop.append(bn)
    for n in drop:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for n in [n for n in g.node if n.op_type == "Constant" and not set(n.output) & used]:
        g.node.remove(n)
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    onnx.save(m, dst)


def equalize(src, dst, input_name, tensors, into_pointwise=0.5, floor=1e-3):
    """Equalise the channel ranges of the activations between convs (cross-layer
    equalisation, in f32, before quantisation).

    ONNX Runtime quantises an activation with one scale per tensor; SFace's channels
    differ up to 8x in range, so the small ones get few levels. PRelu is positively
    homogeneous per channel (PRelu(t*x) = t*PRelu(x), t > 0), so for every
    Conv A -> PRelu -> Conv B, channel c of A's output can be multiplied by t_c
    (A's weights and bias) and B's input divided by t_c (B's weights) without
    changing the function. t_c = (R / r_c) ** p, r_c = the channel's largest |value|
    over the calibration tensors (f32), R = the largest r_c (r_c floored at R * floor).
    When B is depthwise both scalings fall on per-channel int8 weights and cost
    nothing: p = 1. When B is a full conv, the division mixes into B's per-output-
    channel weights: p = into_pointwise (0 leaves those pairs alone).
    """
    m = onnx.load(src)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name]).astype(np.float64)
    producer = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pairs = []
    for b in g.node:
        if b.op_type != "Conv" or b.input[1] not in inits:
            continue
        p = producer.get(b.input[0])
        if p is None or p.op_type != "PRelu" or len(consumers[b.input[0]]) != 1:
            continue
        a = producer.get(p.input[0])
        if (a is None or a.op_type != "Conv" or len(consumers[a.output[0]]) != 1 or len(a.input) < 3
                or a.input[1] not in inits or a.input[2] not in inits):
            continue
        depthwise = next((x.i for x in b.attribute if x.name == "group"), 1) > 1
        if depthwise or into_pointwise:
            pairs.append((a, b, 1.0 if depthwise else into_pointwise, depthwise))
    probe = onnx.ModelProto.FromString(m.SerializeToString())
    names = [a.output[0] for a, *_ in pairs]
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    ranges = [0.0] * len(pairs)
    for t in tensors:
        for k, x in enumerate(sess.run(names, {input_name: t})):
            ranges[k] = np.maximum(ranges[k], np.abs(x).max(axis=(0, 2, 3)).astype(np.float64))
    for (a, b, power, depthwise), r in zip(pairs, ranges):
        t = (r.max() / np.maximum(r, r.max() * floor)) ** power
        inits[a.input[1]].CopyFrom(numpy_helper.from_array((arr(a.input[1]) * t[:, None, None, None]).astype(np.float32),
                                                           a.input[1]))
        inits[a.input[2]].CopyFrom(numpy_helper.from_array((arr(a.input[2]) * t).astype(np.float32), a.input[2]))
        wb = arr(b.input[1]) / (t[:, None, None, None] if depthwise else t[None, :, None, None])
        inits[b.input[1]].CopyFrom(numpy_helper.from_array(wb.astype(np.float32), b.input[1]))
    onnx.save(m, dst)


def bias_correct(qdq, f32, out, input_name, tensors):
    """Empirical bias correction of a QDQ model, in place of its int32 biases.

    For every quantised Conv/Gemm, in graph order, the mean per output channel of
    what the int8 model passes on (the dequantised output) is compared with the
    f32 model's output (`f32`: the folded, pre-processed model that was quantised)
    over the calibration tensors, and round(mean error / bias scale) is taken off
    that layer's int32 bias; later layers are measured with the earlier ones
    already corrected. Weight rounding and activation clipping shift channel means
    (up to 0.19 on SFace's last pointwise conv); this takes the systematic part out.
    Deterministic: float64 sums in a fixed order over ORT's (one-thread) outputs.
    """
    q = onnx.load(qdq)
    g = q.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = []  # (node name, tensor the int8 model passes on, int32 bias initializer, its scale)
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3:
            continue
        bdq = producer.get(n.input[2])
        if bdq is None or bdq.op_type != "DequantizeLinear" or bdq.input[0] not in inits:
            continue  # a node kept in f32
        seen = n.output[0]
        qn = [c for c in consumers.get(seen, []) if c.op_type == "QuantizeLinear"]
        if qn:
            seen = next(c for c in consumers[qn[0].output[0]] if c.op_type == "DequantizeLinear").output[0]
        layers.append((n.name, seen, bdq.input[0], numpy_helper.to_array(inits[bdq.input[1]]).astype(np.float64)))

    def channel_means(model, names):
        m = onnx.ModelProto.FromString(model.SerializeToString())
        have = {o.name for o in m.graph.output}
        for name in names:
            if name not in have:
                m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        sess = ort.InferenceSession(m.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        sums = [0.0] * len(names)
        for t in tensors:
            for k, x in enumerate(sess.run(names, {input_name: t})):
                x = x.astype(np.float64)
                sums[k] = sums[k] + x.mean(axis=tuple(a for a in range(x.ndim) if a != 1))
        return [v / len(tensors) for v in sums]

    ref_model = onnx.load(f32)
    by_name = {n.name: n for n in ref_model.graph.node}
    reference = channel_means(ref_model, [by_name[name].output[0] for name, *_ in layers])
    for (name, seen, bias, scale), want in zip(layers, reference):
        err = channel_means(q, [seen])[0] - want
        b = numpy_helper.to_array(inits[bias]).astype(np.int64) - np.round(err / scale).astype(np.int64)
        inits[bias].CopyFrom(numpy_helper.from_array(np.clip(b, -2**31, 2**31 - 1).astype(np.int32), bias))
    onnx.save(q, out)


METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}


def quantize(f32, out, input_name, tensors, plan):
    with tempfile.TemporaryDirectory() as tmp:
        pre, folded = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "folded.onnx")
        if plan.get("fold", True):
            fold_batchnorm(f32, folded, into_gemm_input=plan.get("fold_gemm_input", True))
            f32 = folded
        if plan.get("equalize") is not None:
            equalized = os.path.join(tmp, "equalized.onnx")
            equalize(f32, equalized, input_name, tensors, into_pointwise=plan["equalize"])
            f32 = equalized
        quant_pre_process(f32, pre, skip_symbolic_shape=True)
        extra = {}
        if plan.get("extra") == "avg":
            extra["CalibMovingAverage"] = True
        if plan["method"] == "percentile":
            extra["CalibPercentile"] = plan.get("percentile", 99.99)
        if plan.get("u16"):
            extra["TensorQuantOverrides"] = {t: [{"quant_type": QuantType.QUInt16}] for t in plan["u16"]}
        qdq = os.path.join(tmp, "qdq.onnx")
        quantize_static(pre, qdq, Reader(input_name, tensors), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=METHODS[plan["method"]], nodes_to_exclude=plan.get("exclude", []),
                        extra_options=extra)
        if plan.get("bias_correct"):
            bias_correct(qdq, pre, out + ".tmp", input_name, tensors)
        else:
            os.replace(qdq, out + ".tmp")
    os.replace(out + ".tmp", out)


# --- fidelity (for --sweep and a quick report) -----------------------------------

def evaluation_set(paths, yunet_f32):
    """Every face of the unmodified photos, f32-detected and aligned; plus held-out variants (another seed)."""
    det = session(yunet_f32)
    originals, frames = [], []
    for p in paths:
        img = load_rgb(p)
        t, rx, ry = letterbox(img)
        frames.append((t, rx, ry))
        arr = np.asarray(img)
        originals += [align(arr, f["landmarks"])[None] for f in detect(det, t, rx, ry)]
    _, held_out = calibration_sets(paths, yunet_f32, seed=SEED + 1000, n=3)
    _, whole = calibration_sets(paths, yunet_f32, seed=SEED + 1000, n=3, windows=False)
    return originals, {"held_out": held_out, "held_out_whole": whole}, frames


def embed(sess, crops):
    e = np.concatenate([sess.run(None, {"data": c})[0] for c in crops])
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def sface_fidelity(f32, q, originals, held_out):
    a, b = session(f32), session(q)
    res = {}
    for name, crops in (("samples", originals), *held_out.items()):
        cos = np.sum(embed(a, crops) * embed(b, crops), axis=1)
        res[name] = {"faces": len(crops), "min": round(float(cos.min()), 4), "p5": round(float(np.percentile(cos, 5)), 4),
                     "median": round(float(np.median(cos)), 4)}
    return res


def yunet_fidelity(f32, q, frames):
    a, b = session(f32), session(q)
    worst, missing, extra = 0.0, 0, 0
    for t, rx, ry in frames:
        fa, fb = detect(a, t, rx, ry), detect(b, t, rx, ry)
        for f in fa:
            m = [g for g in fb if iou(f["bbox"], g["bbox"]) > 0.5]
            if not m:
                missing += 1
                continue
            worst = max(worst, float(np.abs(m[0]["landmarks"] - f["landmarks"]).max()))
        extra += sum(1 for g in fb if not any(iou(f["bbox"], g["bbox"]) > 0.5 for f in fa))
    return {"missing": missing, "extra": extra, "max_landmark_delta_px": round(worst, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=os.path.join(ROOT, "models"), help="where yunet.onnx and sface.onnx are")
    ap.add_argument("--out", help="where the int8 files go (default: --models)")
    ap.add_argument("--samples", default=os.path.join(ROOT, "data", "samples"))
    ap.add_argument("--sweep", action="store_true", help="measure calibration methods and exclusions instead")
    ap.add_argument("--only", choices=["sface", "yunet"], help="quantise (or sweep) one model")
    args = ap.parse_args()
    paths = sample_paths(args.samples)
    yunet, sface = os.path.join(args.models, "yunet.onnx"), os.path.join(args.models, "sface.onnx")
    frames, crops = calibration_sets(paths, yunet)
    print(f"[quantize] calibration: {len(frames)} frames, {len(crops)} aligned faces from {len(paths)} photos",
          file=sys.stderr)
    if not args.sweep:
        if args.only != "yunet":
            quantize(sface, os.path.join(args.out or args.models, "sface-int8.onnx"), "data", crops, SFACE_PLAN)
        if args.only != "sface":
            quantize(yunet, os.path.join(args.out or args.models, "yunet-int8.onnx"), "input", frames, YUNET_PLAN)
        return
    originals, held_out, eval_frames = evaluation_set(paths, yunet)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "q.onnx")
        if args.only != "yunet":
            for plan in SFACE_SWEEP:
                quantize(sface, out, "data", crops, plan)
                print(json.dumps({"model": "sface", **plan, **sface_fidelity(sface, out, originals, held_out)}), flush=True)
        if args.only != "sface":
            for method in ["minmax", "percentile", "entropy"]:
                plan = {"method": method, "exclude": []}
                quantize(yunet, out, "input", frames, plan)
                print(json.dumps({"model": "yunet", **plan, **yunet_fidelity(yunet, out, eval_frames)}), flush=True)


if __name__ == "__main__":
    main()
