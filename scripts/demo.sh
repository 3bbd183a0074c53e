#!/usr/bin/env bash
# The end-to-end demo on embedded defaults: a synthetic hospital archive is generated and
# indexed into a station's FAIR index, a researcher builds and signs the cohort-stats train,
# the data owner trusts the researcher and approves the train, the station runs it (counts
# with small cells suppressed by the station); then the data owner allows imaging and
# on-station training, and a second train has the station train a U-Net and a CNN on lesion
# patches and release only metrics; an auditor verifies the station's log.
# Everything lands in ./demo-out (removed and recreated on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin amicus
A="$PWD/target/release/amicus"
OUT="$PWD/demo-out"
rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "researcher: key pair and signed train bundle"
"$A" keygen --out alice.key
"$A" train build ../trains/cohort-stats --out cohort-stats.train
"$A" train sign cohort-stats.train --key alice.key --role author
"$A" train inspect cohort-stats.train
"$A" train verify cohort-stats.train --trust alice.pub

step "hospital: a synthetic DICOM archive (CT + RTSTRUCT + SEG, fake identities)"
"$A" synth --out archive --site "Demo Hospital" --patients 24 --seed 1 --profile academic

step "hospital: a station (deny by default) and its FAIR index"
"$A" station init --dir st1 --archive archive --name demo-hospital
"$A" station index --dir st1
"$A" station query --dir st1 'PREFIX ldcm: <https://johanvansoest.nl/ontologies/LinkedDicom/>
SELECT ?modality (COUNT(?series) AS ?series_count) WHERE { ?series ldcm:T00080060 ?modality } GROUP BY ?modality'
"$A" station catalog --dir st1 > catalog.ttl
echo "public catalog (aggregate counts only): $OUT/catalog.ttl"
step "the station refuses the train until its data owner trusts the signer and approves it"
if "$A" station run --dir st1 cohort-stats.train; then
  echo "demo: the unapproved train ran; that must never happen" >&2
  exit 1
fi
"$A" station trust --dir st1 alice.pub
"$A" station approve --dir st1 cohort-stats.train

step "station: verify, admit and run"
echo '{"tables": ["modality", "body_part", "roi", "segment"]}' > params.json
"$A" station run --dir st1 cohort-stats.train --params params.json

step "data owner: allow imaging and on-station training (kernels) in the station's policy"
sed -i 's/^allowed_capabilities = .*/allowed_capabilities = ["cohort", "imaging", "kernels"]/' st1/policy.toml
grep '^allowed_capabilities' st1/policy.toml

step "researcher: a train that has the station train a U-Net and a CNN on lesion patches"
"$A" train build ../trains/lesion-models --out lesion-models.train
"$A" train sign lesion-models.train --key alice.key --role author
"$A" station approve --dir st1 lesion-models.train
echo '{"steps": 60, "batch": 16}' > train-params.json
"$A" station run --dir st1 lesion-models.train --params train-params.json

step "auditor: the station's log"
"$A" audit show --dir st1
"$A" audit verify --dir st1
printf '\ndemo finished: everything is in %s\n' "$OUT"
