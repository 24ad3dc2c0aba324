#!/usr/bin/env bash
# Batch CLI figures (docs/PERFORMANCE.md, "Batch CLI"). Needs release builds:
#   cargo build --release --bin facematch --example index_harness --example batch_search
# and the peers (scripts/setup.sh --with-peers). OLD=path/to/a/facematch built before
# the batch path (e.g. commit b71d2d8) adds the one-at-a-time figures.
#
#   bash scripts/batch_bench.sh search     # 200k x 128 face-like, 10,000 queries, 1 thread: CLI vs hnswlib vs engine
#   bash scripts/batch_bench.sh identify   # >= 100 photos (the samples repeated): identify vs faces --embeddings
#   bash scripts/batch_bench.sh rss        # peak RSS of identify --from-list over 1k / 10k / 100k paths
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
NEW=${NEW:-$T/facematch}
OLD=${OLD:-}
W=${WORK:-/tmp/facematch-batch-bench}
PY=.venv/bin/python
RUNS=${RUNS:-3}
mkdir -p "$W"
export FACEMATCH_OPERATOR=bench

secs() { # secs CMD...: wall seconds of one run, output discarded
    local s e
    s=$(date +%s.%N); "$@" > /dev/null 2>&1 || true; e=$(date +%s.%N)
    echo "$e - $s" | bc
}

two_people() { # two_people BIN GALLERY KEYFILE: barack and joe enrolled for door-access
    local bin=$1 g=$2 k=$3 S=data/samples
    $bin keygen --out "$k" 2> /dev/null
    $bin init -g "$g" --key-file "$k" --purpose door-access:365 > /dev/null
    $bin consent -g "$g" --key-file "$k" --subject barack --consent-id f1 --purpose door-access > /dev/null
    $bin consent -g "$g" --key-file "$k" --subject joe --consent-id f2 --purpose door-access > /dev/null
    $bin enrol -g "$g" --key-file "$k" --subject barack --consent-id f1 --purpose door-access $S/obama.jpg > /dev/null
    $bin enrol -g "$g" --key-file "$k" --subject joe --consent-id f2 --purpose door-access $S/biden.jpg > /dev/null
}

gallery_200k() {
    local D="$W/data"
    if [ ! -f "$W/harness.json" ]; then
        "$T/examples/index_harness" --data structured --n 200000 --dim 128 --queries 10000 \
            --ef 16,24,32,48,64,96,128,192,256 --threads 1 --backends facematch-exact,peers --peer-backends hnswlib \
            --dir "$D" --out "$W/harness.json" --min-secs 2 >&2
    fi
    if [ ! -d "$W/g200k" ]; then
        $NEW keygen --out "$W/key.hex"
        $PY - "$D" <<'PY'
import numpy as np, sys
d = sys.argv[1]
gi = np.load(f"{d}/gallery_identity.npy")
open(f"{d}/manifest.txt", "w").write("".join(f"p{i}\n" for i in gi))
q = np.load(f"{d}/queries.npy")
np.save(f"{d}/q1.npy", q[:1])
PY
        $NEW init -g "$W/g200k" --key-file "$W/key.hex" --dim 128 --model-id synthetic --purpose door-access:365 > /dev/null
        $NEW import -g "$W/g200k" --key-file "$W/key.hex" --embeddings "$D/gallery.npy" --manifest "$D/manifest.txt" --purpose door-access --consent-basis legal:bench-data > /dev/null
    fi
}

mate1() { # mate1 OUT.jsonl: mate@1 over enrolled queries
    $PY - "$1" "$W/data/query_identity.npy" <<'PY'
import json, sys, numpy as np
qi = np.load(sys.argv[2])
hit = tot = 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    i = qi[r["query"]]
    if i < 0: continue
    tot += 1
    c = r.get("candidates") or []
    hit += bool(c) and c[0]["subject"] == f"p{i}"
print(f"{hit / tot:.4f}")
PY
}

case "${1:-}" in
search)
    gallery_200k
    D="$W/data"
    G=(-g "$W/g200k" --key-file "$W/key.hex" --purpose door-access --k 10)
    echo "# search, 200k x 128, 10,000 queries, k=10; wall seconds minus a 1-query run (open + load)"
    for run in $(seq "$RUNS"); do
        for b in NEW ${OLD:+OLD}; do
            bin=${!b}
            extra=(); [ "$b" = NEW ] && extra=(--threads 1 -q)
            full=$(secs "$bin" search "${G[@]}" --embeddings "$D/queries.npy" "${extra[@]}")
            one=$(secs "$bin" search "${G[@]}" --embeddings "$D/q1.npy" "${extra[@]}")
            echo "$b run $run: ${full}s total, ${one}s open+1 query, $(echo "9999 / ($full - $one)" | bc) queries/s"
        done
    done
    $NEW search "${G[@]}" --embeddings "$D/queries.npy" --threads 1 --out "$W/new.jsonl" 2>&1
    echo "NEW mate@1 $(mate1 "$W/new.jsonl")"
    if [ -n "$OLD" ]; then
        $OLD search "${G[@]}" --embeddings "$D/queries.npy" > "$W/old.jsonl"
        echo "OLD mate@1 $(mate1 "$W/old.jsonl")"
    fi
    FACEMATCH_KEY=$(cat "$W/key.hex") "$T/examples/batch_search" "$W/g200k" door-access "$D/queries.npy" 10 1
    $PY - "$W/harness.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("harness target mate@1", r["target_mate_at_1"])
for row in r["rows"]:
    print(row["backend"], row["mode"], "ef", row["ef"], "mate@1", round(row["accuracy"]["mate_at_1"], 4), "qps", [round(q) for _, q in row["qps"]])
PY
    ;;
identify)
    S=data/samples
    [ -d "$W/gid" ] || two_people "$NEW" "$W/gid" "$W/key-id.hex"
    ls $S/*.jpg > "$W/one.txt"
    for i in $(seq 12); do cat "$W/one.txt"; done | head -144 > "$W/list144.txt"
    mapfile -t IMGS < "$W/list144.txt"
    G=(-g "$W/gid" --key-file "$W/key-id.hex" --purpose door-access)
    # The old build on a gallery of its own format.
    if [ -n "$OLD" ] && [ ! -d "$W/gold" ]; then two_people "$OLD" "$W/gold" "$W/key-old.hex"; fi
    echo "# ${#IMGS[@]} photos (the 13 samples repeated), wall seconds including model load; NEW default = int8 SFace, OLD = f32"
    for run in $(seq "$RUNS"); do
        echo "run $run: NEW identify $(secs $NEW identify "${G[@]}" -q --from-list "$W/list144.txt")s," \
            "NEW identify --precision f32 $(secs $NEW identify --precision f32 "${G[@]}" -q --from-list "$W/list144.txt")s," \
            "NEW faces --embeddings $(secs $NEW faces --embeddings -q --from-list "$W/list144.txt")s," \
            "NEW faces --embeddings --precision f32 $(secs $NEW faces --precision f32 --embeddings -q --from-list "$W/list144.txt")s" \
            ${OLD:+", OLD identify $(secs $OLD identify -g "$W/gold" --key-file "$W/key-old.hex" --purpose door-access "${IMGS[@]}")s"}
    done
    ;;
rss)
    S=$(realpath data/samples)
    [ -d "$W/gid" ] || { echo "run identify first"; exit 1; }
    G=(-g "$W/gid" --key-file "$W/key-id.hex" --purpose door-access)
    echo "# identify --from-list: one real photo in 50 paths, the rest missing files (error rows); peak RSS"
    for n in 1000 10000 100000; do
        $PY - "$S" "$n" > "$W/list$n.txt" <<'PY'
import sys, os
s, n = sys.argv[1], int(sys.argv[2])
imgs = sorted(f for f in os.listdir(s) if f.endswith(".jpg"))
for i in range(n):
    print(f"{s}/{imgs[i // 50 % len(imgs)]}" if i % 50 == 0 else f"/nonexistent/{i}.jpg")
PY
        /usr/bin/time -f "%M" -o "$W/rss$n" $NEW identify "${G[@]}" -q --from-list "$W/list$n.txt" --format csv --out "$W/rss$n.csv" || true
        echo "$n paths: peak RSS $(($(tail -1 "$W/rss$n") / 1024)) MiB, $(($(wc -l < "$W/rss$n.csv") - 1)) rows"
    done
    ;;
*) echo "usage: $0 search|identify|rss" >&2; exit 2 ;;
esac
