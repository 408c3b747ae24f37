#!/usr/bin/env bash
# Installs everything and runs the whole test suite. Under PTX_REQUIRE_SERVICES=1
# (CI) a test that cannot reach Redis, PostgreSQL, Orthanc, dcmtk or dciodvfy fails.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
echo "== ruff"
.venv/bin/ruff check . || exit 1
echo "== pytest"
.venv/bin/python -m pytest -q -ra --durations=15 "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
