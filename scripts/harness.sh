#!/usr/bin/env bash
# Index benchmark harness: standard configurations of docs/BENCHMARK_DATA.md.
#
#   bash scripts/harness.sh smoke          20k x 128 structured (about a minute)
#   bash scripts/harness.sh structured-1m  1M x 128 structured  (anchor; long: tens of minutes)
#   bash scripts/harness.sh isotropic-200k 200k x 512 isotropic (anchor; long: ~1 hour with hnsw_rs)
#   bash scripts/harness.sh all            the three above
#
# Choose backends with BACKENDS=exact,facematch-int8,peers; other arguments after the
# configuration name go to the harness, e.g.
#   bash scripts/harness.sh smoke --ef 64,128
# Results: bench-results/<config>.json and .md; data (.npy, reused across runs)
# under bench-data/<config>/ (or $FACEMATCH_BENCH_DATA).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG="${1:-smoke}"
shift || true

# Peers: hnswlib 0.8.0 and faiss-cpu 1.15.1 in .venv (idempotent).
if ! .venv/bin/python -c "import hnswlib, faiss" 2>/dev/null; then
  bash scripts/setup.sh --with-peers
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release --features hnsw-rs-baseline --example index_harness
BIN="$CARGO_TARGET_DIR/release/examples/index_harness"
DATA="${FACEMATCH_BENCH_DATA:-$ROOT/bench-data}"
OUT="$ROOT/bench-results"
mkdir -p "$OUT" "$DATA"

run() { # name args...
  local name="$1"; shift
  echo "[harness.sh] $name: $*" >&2
  nice "$BIN" --dir "$DATA/$name" --out "$OUT/$name.json" "$@" | tee "$OUT/$name.md"
}

smoke() {
  run smoke --data structured --n 20000 --dim 128 --queries 1000 --seed 42 \
    --m 16 --efc 200 --ef 16,32,64,128,256 --threads 1,2 --build-threads 2 \
    --threshold 0.5 --backends "${BACKENDS:-exact,facematch-exact,facematch,facematch-int8,hnsw_rs,peers}" "$@"
}
structured_1m() {
  run structured-1m --data structured --n 1000000 --dim 128 --queries 1000 --seed 42 \
    --m 16 --efc 200 --ef 16,32,64,128,256,512,1024 --threads 1,2 --build-threads 2 \
    --threshold 0.55 --backends "${BACKENDS:-exact,facematch-exact,facematch,facematch-int8,hnsw_rs,peers}" "$@"
}
isotropic_200k() {
  run isotropic-200k --data isotropic --n 200000 --dim 512 --queries 1000 --seed 42 \
    --m 16 --efc 200 --ef 64,128,256,512,1024,2048 --threads 1,2 --build-threads 2 \
    --threshold 0.35 --backends "${BACKENDS:-exact,facematch-exact,facematch,facematch-int8,hnsw_rs,peers}" "$@"
}

case "$CONFIG" in
  smoke) smoke "$@" ;;
  structured-1m) structured_1m "$@" ;;
  isotropic-200k) isotropic_200k "$@" ;;
  all) smoke "$@"; structured_1m "$@"; isotropic_200k "$@" ;;
  *) echo "harness.sh: unknown configuration $CONFIG (smoke, structured-1m, isotropic-200k, all)" >&2; exit 2 ;;
esac
