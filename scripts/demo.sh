#!/usr/bin/env bash
# The end-to-end demo on embedded defaults: a researcher builds and signs the cohort-stats
# train, a hospital creates a station, its data owner trusts the researcher and approves the
# train, the station runs it, and an auditor verifies the station's log.
# Everything lands in ./demo-out (removed and recreated on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin amicus
A="$PWD/target/release/amicus"
OUT="$PWD/demo-out"
rm -rf "$OUT"
mkdir -p "$OUT/archive"
cd "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "researcher: key pair and signed train bundle"
"$A" keygen --out alice.key
"$A" train build ../trains/cohort-stats --out cohort-stats.train
"$A" train sign cohort-stats.train --key alice.key --role author
"$A" train inspect cohort-stats.train
"$A" train verify cohort-stats.train --trust alice.pub

step "hospital: a station (deny by default)"
"$A" station init --dir st1 --archive archive --name demo-hospital
step "the station refuses the train until its data owner trusts the signer and approves it"
if "$A" station run --dir st1 cohort-stats.train; then
  echo "demo: the unapproved train ran; that must never happen" >&2
  exit 1
fi
"$A" station trust --dir st1 alice.pub
"$A" station approve --dir st1 cohort-stats.train

step "station: verify, admit and run"
echo '{"min_cell": 5}' > params.json
"$A" station run --dir st1 cohort-stats.train --params params.json

step "auditor: the station's log"
"$A" audit show --dir st1
"$A" audit verify --dir st1
printf '\ndemo finished: everything is in %s\n' "$OUT"
