#!/usr/bin/env bash
# Installs everything ptx-node needs on a fresh Debian machine (run as root or with sudo):
# the PACS peer and DICOM tools from Debian, then a virtual environment with the project.
#   PTX_SETUP_APT=0  skip the Debian packages (already installed)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if [ "${PTX_SETUP_APT:-1}" = 1 ]; then
  echo "== Debian packages: orthanc, orthanc-dicomweb, dcmtk, dicom3tools, pixelmed-apps, redis-server, chromium, docker-compose, prometheus"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends \
      orthanc orthanc-dicomweb dcmtk dicom3tools pixelmed-apps redis-server \
      chromium chromium-driver fonts-dejavu-core docker-compose systemd prometheus >/dev/null
  # npm fetches the OHIF viewer for the browser test; keep a Node.js that is already there.
  command -v npm >/dev/null || $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "== virtual environment (.venv) with $PYTHON"
  "$PYTHON" -m venv .venv
fi
echo "== pip install -e '.[test]' (torch 2.14.1 pinned)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

if [ "${PTX_SETUP_OHIF:-1}" = 1 ] && command -v npm >/dev/null; then
  echo "== OHIF viewer (npm @ohif/app dist) for the browser test"
  tests/browser/fetch_ohif.sh
fi
