#!/usr/bin/env bash
# The test command of the README's quick start (and of .ci/run): set up, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
