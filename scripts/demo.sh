#!/usr/bin/env bash
# The main job on one machine: installs what it needs, then runs the node on its
# embedded default against a local Orthanc, sends RG1_UNCR.dcm (pydicom-data) and a
# generated chest phantom, prints the job table and the overlay PNG paths.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-demo-out}"
mkdir -p "$out"
echo "== generating a chest phantom with a known pneumothorax"
.venv/bin/ptx-train synth "$out/phantom-set" --n 1 --size 1024 --seed 7 --positive-fraction 1.0 >/dev/null
phantom=$(find "$out/phantom-set" -name '*.dcm' | head -n 1)
rg1=$(.venv/bin/python -c "from pydicom.data import get_testdata_file as g; print(g('RG1_UNCR.dcm', download=False))")
echo "== ptx-node demo"
exec .venv/bin/ptx-node demo --out "$out/run" "$rg1" "$phantom"
