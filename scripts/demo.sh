#!/usr/bin/env bash
# The end-to-end demo on embedded defaults: a synthetic hospital archive is generated and
# indexed into a station's FAIR index, a researcher builds and signs the cohort-stats train,
# the data owner trusts the researcher and approves the train, the station runs it (counts
# with small cells suppressed by the station); then the data owner allows imaging and
# on-station training, and a second train has the station train a U-Net and a CNN on lesion
# patches and release only metrics; an auditor verifies the station's log. Finally the same
# cohort-stats train travels over the network: a registry (SQLite) on loopback, three station
# daemons that only connect out, a data owner who approves from the station side, results
# sealed to the researcher's key, and an auditor who verifies every station through the registry.
# Last, `amicus demo`: a federated job trains one lesion-segmentation U-Net across three more
# synthetic hospitals, with an HTML report.
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

step "network: a registry on loopback (SQLite), its people, two more hospitals"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export AMICUS_REGISTRY="http://127.0.0.1:$PORT"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
"$A" registry user add --db sqlite://registry.db --name root --role admin --token-out root.token
"$A" keygen --x25519 --out alice-results.key
"$A" registry user add --db sqlite://registry.db --name alice --role researcher \
  --enc-key alice-results.pub --token-out alice.token
"$A" registry user add --db sqlite://registry.db --name audrey --role auditor --token-out audrey.token
"$A" registry serve --db sqlite://registry.db --listen "127.0.0.1:$PORT" > registry.log 2>&1 &
PIDS+=($!)
for i in 1 2 3 4 5 6 7 8 9 10; do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.3; done
for st in st2:community:2 st3:legacy:3; do
  IFS=: read -r name profile seed <<< "$st"
  "$A" synth --out "archive-$name" --site "$name hospital" --patients 16 --seed "$seed" --profile "$profile" > /dev/null
  "$A" station init --dir "$name" --archive "archive-$name" --name "$name" > /dev/null
  "$A" station index --dir "$name" > /dev/null
  "$A" station trust --dir "$name" alice.pub
done
# Each data owner trusts alice's key for the requests she signs (what runs, with which
# parameters, sealed to which key): a registry that changes any of it is refused.
for name in st1 st2 st3; do
  "$A" station trust --dir "$name" --researcher --name alice alice.pub
done
"$A" station approve --dir st2 cohort-stats.train
for name in st1 st2 st3; do
  "$A" registry station add --token-file root.token --name "$name" --key "$name/station.pub"
  "$A" station serve --dir "$name" --poll-wait 2 > "daemon-$name.log" 2>&1 &
  PIDS+=($!)
done

step "researcher: push the signed train and ask all three hospitals"
"$A" train push --token-file alice.token cohort-stats.train
TASK=$("$A" task create --token-file alice.token --train cohort-stats.train \
  --station st1 --station st2 --station st3 --params params.json \
  --sign-key alice.key --recipient-key alice-results.pub \
  --station-key st1=st1/station.pub --station-key st2=st2/station.pub --station-key st3=st3/station.pub --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo "task $TASK"

step "st3's data owner has not approved this train: the daemon holds it until they decide"
for i in $(seq 1 100); do
  RUN=$("$A" station pending --dir st3 --json | python3 -c 'import json, sys; p = json.load(sys.stdin); print(p[0]["item"]["run"] if p else "")')
  [ -n "$RUN" ] && break
  sleep 0.2
done
"$A" station pending --dir st3
"$A" station approve --dir st3 "$RUN"

step "researcher: the runs finish; the sealed results open only with alice's key"
"$A" task show --token-file alice.token "$TASK" --wait 120s
"$A" task results --token-file alice.token "$TASK" --key alice-results.key --out results \
  --station-key st1=st1/station.pub --station-key st2=st2/station.pub --station-key st3=st3/station.pub

step "auditor: every station's log, verified through the registry (keys pinned), and the registry's trail"
sleep 3
for name in st1 st2 st3; do
  "$A" audit verify --token-file audrey.token --station "$name" --key "$name/station.pub"
done
"$A" registry audit --token-file audrey.token > registry-trail.txt
echo "registry trail: $OUT/registry-trail.txt"

step "federated: amicus demo (three more hospitals, a registry, three daemons, a federated U-Net, a report)"
kill "${PIDS[@]}" 2>/dev/null || true
"$A" demo --out federated
printf '\ndemo finished: everything is in %s; the federated report is %s\n' "$OUT" "$OUT/federated/report/report.html"
