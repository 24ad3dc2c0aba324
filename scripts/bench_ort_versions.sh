#!/usr/bin/env bash
# Choose the ONNX Runtime version by measurement: end-to-end faces/s of the
# release `throughput` example (decode, detect, align, embed over the sample
# photos) against each version's shared library, for each precision, runs
# interleaved (v1 v2 ... v1 v2 ...) so that background load hits all alike.
#
#   bash scripts/bench_ort_versions.sh [ROUNDS] [VERSION...]
#     default: 3 rounds; 1.23.2 1.24.4 1.25.1 1.26.0 1.27.0 1.31.1 1.32.0
#   PRECISIONS="f32 int8" (default: f32, int8 recogniser + f32 detector, int8 both)
#
# Each library comes from the version's PyPI wheel (cp311 manylinux x86_64, fetched
# with pip into .cache/downloads, its sha256 printed); nothing else is downloaded.
# Whichever version wins must also pass the test suite before set-up pins it:
#   ORT_DYLIB_PATH=$PWD/.cache/ort/VERSION/libonnxruntime.so cargo test --locked
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
shift || true
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(1.23.2 1.24.4 1.25.1 1.26.0 1.27.0 1.31.1 1.32.0)
CACHE=.cache/downloads
T=${CARGO_TARGET_DIR:-target}/release/examples/throughput
mkdir -p "$CACHE"
cargo build --release --quiet --example throughput

for v in "${VERSIONS[@]}"; do
  lib=.cache/ort/$v/libonnxruntime.so
  [ -f "$lib" ] && continue
  python3 -m pip download --quiet --no-deps -d "$CACHE" --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp "onnxruntime==$v"
  whl=$(ls "$CACHE"/onnxruntime-"$v"-cp311-*.whl | head -1)
  echo "# $(basename "$whl") sha256 $(sha256sum "$whl" | cut -d' ' -f1)" >&2
  mkdir -p ".cache/ort/$v"
  python3 - "$whl" "$v" "$lib" <<'EOF'
import sys, zipfile
whl, v, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    open(out, "wb").write(z.read(f"onnxruntime/capi/libonnxruntime.so.{v}"))
EOF
done

read -r -a PRECS <<< "${PRECISIONS:-f32 int8/f32 int8}"
echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# version precision(recogniser/detector) round faces/s cpu-ms/face"
for r in $(seq "$ROUNDS"); do
  for v in "${VERSIONS[@]}"; do
    for p in "${PRECS[@]}"; do
      rec=${p%%/*}
      det=${p#*/}
      out=$(ORT_DYLIB_PATH="$PWD/.cache/ort/$v/libonnxruntime.so" "$T" --rounds 3 --precision "$rec" --det-precision "$det" | tail -1)
      echo "$v $p $r $(echo "$out" | python3 -c 'import json,sys; d = json.loads(sys.stdin.read()); print(d["faces_per_s"], d["cpu_ms_per_face"])')"
    done
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
