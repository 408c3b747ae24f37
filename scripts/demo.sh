#!/usr/bin/env bash
# The main job on one machine: installs what it needs, trains the demo model on synthetic
# phantoms (first run only, then cached under OUT/cache), then runs the node on its embedded
# default against a local Orthanc, sends RG1_UNCR.dcm (pydicom-data) and a generated chest
# phantom, prints the job table, the overlay PNG paths and the phantom's Dice.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-demo-out}"
mkdir -p "$out"
echo "== demo model (a small U-Net trained by ptx-train on synthetic phantoms; cached after the first run)"
.venv/bin/ptx-train demo-model "$out/cache/demo-model" --quiet
echo "== generating a chest phantom with a known pneumothorax"
rm -rf "$out/phantom-set"
.venv/bin/ptx-train synth "$out/phantom-set" --n 1 --size 1024 --seed 7 --positive-fraction 1.0 --mask-png >/dev/null
phantom=$(find "$out/phantom-set" -name '*.dcm' | head -n 1)
mask="$out/phantom-set/masks/$(basename "$phantom" .dcm).png"
rg1=$(.venv/bin/python -c "from pydicom.data import get_testdata_file as g; print(g('RG1_UNCR.dcm', download=False))")
echo "== ptx-node demo"
exec .venv/bin/ptx-node demo --out "$out/run" --checkpoint "$out/cache/demo-model/run/checkpoint" \
  --known-mask "$mask" "$rg1" "$phantom"
