#!/usr/bin/env bash
# The main job on the bundled sample photos: set up, build, detect + embed every
# sample, then a full gallery round: consent, enrol, verify, identify, withdraw,
# compact, audit verify. Everything lands in a temporary directory (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/facematch"
S=data/samples
WORK="${1:-$(mktemp -d -t facematch-demo.XXXXXX)}"
mkdir -p "$WORK"
G="$WORK/gallery"
K="$WORK/key"
export FACEMATCH_OPERATOR=demo-operator
step() { printf '\n== %s\n' "$*"; }

step "faces: detect + embed all sample photos (embeddings go to $WORK/faces.jsonl, not the screen)"
$BIN faces --embeddings $S/*.jpg > "$WORK/faces.jsonl" || true
python3 - "$WORK/faces.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    name = r["image"].split("/")[-1]
    if "error" in r:
        print(f"  {name:28s} error: {r['error']}")
    else:
        print(f"  {name:28s} {len(r['faces'])} face(s), scores " + ", ".join(f"{f['score']:.2f}" for f in r["faces"]))
PY

step "gallery: new key, new gallery with two purposes"
rm -rf "$G" "$K"
$BIN keygen --out "$K"
$BIN init -g "$G" --key-file "$K" --purpose door-access:365 --purpose payment:90 > /dev/null

step "consent + enrolment (main face only; images are not stored)"
$BIN consent -g "$G" --key-file "$K" --subject alice --consent-id form-001 --purpose door-access
$BIN consent -g "$G" --key-file "$K" --subject bob --consent-id form-002 --purpose door-access --purpose payment
$BIN consent -g "$G" --key-file "$K" --subject barack --consent-id form-003 --purpose door-access
$BIN enrol -g "$G" --key-file "$K" --subject alice --consent-id form-001 --purpose door-access $S/person_a_1.jpg
$BIN enrol -g "$G" --key-file "$K" --subject bob --consent-id form-002 --purpose door-access --purpose payment $S/person_b_1.jpg
$BIN enrol -g "$G" --key-file "$K" --subject barack --consent-id form-003 --purpose door-access $S/obama.jpg
echo "-- a child without a guardian's consent is refused:"
$BIN consent -g "$G" --key-file "$K" --subject kid --consent-id form-004 --purpose door-access --age under-14 || true

step "1:1 verify (door-access)"
for pair in "alice person_a_2" "alice impostor_1" "bob person_b_2" "barack obama2"; do
  set -- $pair
  $BIN verify -g "$G" --key-file "$K" --purpose door-access --subject "$1" $S/$2.jpg \
    | python3 -c "import json,sys; r=json.load(sys.stdin)['result']; v=r['verification']; print(f\"  $2 vs $1: {v['decision']['decision']:10s} score {v['score']:.3f} (threshold {v['threshold']['value']})\")"
done

step "1:N identify (door-access); faces that match nobody are discarded"
$BIN identify -g "$G" --key-file "$K" --purpose door-access $S/person_b_2.jpg $S/obama3.jpg $S/biden.jpg $S/t1.jpg \
  | python3 -c "
import json,sys
for line in sys.stdin:
    r=json.loads(line); n=r['image'].split('/')[-1]
    if 'error' in r: print(f'  {n}: error {r[\"error\"]}'); continue
    res=r['result']; m=[(x['identification']['decision']['decision'], x['identification']['decision'].get('subject'), round(x['identification']['decision'].get('score',0),3)) for x in res['matches']]
    print(f'  {n}: {res[\"faces_found\"]} face(s), {res[\"faces_discarded\"]} discarded, matches {m}')"

step "withdrawal of consent erases bob's templates, compaction removes the bytes"
$BIN withdraw -g "$G" --key-file "$K" --subject bob --compact
$BIN stats -g "$G" --key-file "$K"

step "audit: verify the chain, show the last records"
$BIN audit verify -g "$G" --key-file "$K"
$BIN audit show -g "$G" --key-file "$K" | tail -n 3
echo
echo "done: work files in $WORK"
