#!/usr/bin/env bash
# Millions harness (issue 17): a face-like N x 128 gallery built and used through
# the CLI, with wall time and peak RSS (GNU time) of every step, disk size, and
# search throughput with mate@1. Peers on the same data with PEERS=1 (faiss flat;
# hnswlib too with HNSWLIB=1, up to 2M; needs scripts/setup.sh --with-peers).
#
#   bash scripts/millions.sh 1000000      # ~1M: minutes
#   bash scripts/millions.sh 10000000     # 10M: tens of minutes, ~12 GB of disk for data + gallery
#
# Data and gallery under ${WORK:-bench-data/millions-N}; the gallery is rebuilt each run.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
Q=${QUERIES:-1000}
W=${WORK:-bench-data/millions-$N}
T=${CARGO_TARGET_DIR:-target}/release
FM=$T/facematch
mkdir -p "$W"
export FACEMATCH_OPERATOR=bench
cargo build --release --locked --bin facematch --example millions_data >&2
"$T/examples/millions_data" --n "$N" --queries "$Q" --out "$W"

G=(-g "$W/gallery" --key-file "$W/key.hex")
step() { # step NAME CMD...: one timed run; prints "NAME: S s, RSS MB"
    local name=$1; shift
    /usr/bin/time -f "%e %M" -o "$W/time.txt" "$@" > "$W/$name.out" 2> "$W/$name.err" || { cat "$W/$name.err" >&2; exit 1; }
    read -r secs kb < "$W/time.txt"
    printf '%-28s %8.2f s  %8.0f MB peak RSS\n' "$name" "$secs" "$(echo "$kb / 1024" | bc -l)"
}
rm -rf "$W/gallery"
rm -f "$W/key.hex"
$FM keygen --out "$W/key.hex" > /dev/null
echo "# millions harness: $N x 128 face-like, $Q probes, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
step init $FM init "${G[@]}" --dim 128 --model-id synthetic --purpose door-access:365
step import $FM import "${G[@]}" --embeddings "$W/gallery.npy" --manifest "$W/subjects.txt" --purpose door-access --consent-basis legal:bench-data
echo "import rate: $(echo "$N / $(cut -d' ' -f1 "$W/time.txt")" | bc) templates/s"
step "open (stats)" $FM stats "${G[@]}"
step "open (stats) again" $FM stats "${G[@]}"
du -sb "$W/gallery"/templates.log "$W/gallery"/index.snap "$W/gallery"/audit 2>/dev/null | while read -r b f; do
    printf '%-28s %8.1f MB  %6.0f bytes/template\n' "$(basename "$f")" "$(echo "$b / 1048576" | bc -l)" "$(echo "$b / $N" | bc -l)"
done
mate1() { # mate1 OUT.jsonl
    python3 - "$1" "$W/truth.txt" <<'PY'
import json, sys
truth = open(sys.argv[2]).read().split()
hit = tot = 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    t = truth[r["query"]]
    if t == "-":
        continue
    tot += 1
    c = r.get("candidates") or []
    hit += bool(c) and c[0]["subject"] == t
print(f"{hit}/{tot}")
PY
}
for threads in 1 2; do
    for strategy in exact auto; do
        step "search $strategy ${threads}t" $FM search "${G[@]}" --purpose door-access --embeddings "$W/queries.npy" --k 10 \
            --strategy "$strategy" --threads "$threads" -q --out "$W/search-$strategy-$threads.jsonl"
        s=$(cut -d' ' -f1 "$W/time.txt")
        echo "    mate@1 $(mate1 "$W/search-$strategy-$threads.jsonl"), $(echo "$Q / $s" | bc) queries/s including open"
    done
done
if [ "${PEERS:-0}" = 1 ]; then
    .venv/bin/python - "$W" "$N" <<'PY'
import os, sys, time, numpy as np
w, n = sys.argv[1], int(sys.argv[2])
g = np.load(f"{w}/gallery.npy", mmap_mode="r"); q = np.load(f"{w}/queries.npy")
truth = open(f"{w}/truth.txt").read().split()
def mate1(ids):
    hit = tot = 0
    for i, t in enumerate(truth):
        if t == "-": continue
        tot += 1; hit += f"p{ids[i][0]}" == t
    return f"{hit}/{tot}"
import faiss
for th in (1, 2):
    faiss.omp_set_num_threads(th)
    t = time.time(); ix = faiss.IndexFlatIP(128); ix.add(np.ascontiguousarray(g)); build = time.time() - t
    t = time.time(); _, I = ix.search(q, 10); s = time.time() - t
    print(f"faiss flat {th}t: add {build:.1f} s, {len(q)/s:.0f} queries/s batched, mate@1 {mate1(I)}")
    t = time.time(); [ix.search(q[i:i+1], 10) for i in range(len(q))]; s = time.time() - t
    print(f"faiss flat {th}t: {len(q)/s:.0f} queries/s one at a time")
    del ix
if n <= 2_000_000 and os.environ.get("HNSWLIB") == "1":
    import hnswlib
    ix = hnswlib.Index(space="ip", dim=128); ix.init_index(max_elements=n, M=16, ef_construction=200); ix.set_num_threads(2)
    t = time.time(); ix.add_items(g); print(f"hnswlib build 2t: {time.time()-t:.0f} s")
    ix.set_ef(128)
    for th in (1, 2):
        ix.set_num_threads(th)
        t = time.time(); I, _ = ix.knn_query(q, 10); s = time.time() - t
        print(f"hnswlib ef=128 {th}t: {len(q)/s:.0f} queries/s batched, mate@1 {mate1(I)}")
else:
    print("hnswlib: HNSWLIB=1 to run it (up to 2M: its build takes minutes at 1M and hours at 10M on 2 cores)")
PY
fi
