#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything salientft needs from this repo's own files.
# Idempotent: a second run only checks that the pinned versions are present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.salientft-installed
want="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
    pip install -q "$(grep '^torch==' requirements/ci.txt)"
    pip install -q -r requirements/ci.txt
    pip install -q --no-deps -r requirements/embedded.txt
    pip install -q --no-deps -e .
    if [ -f requirements/lmeval.txt ]; then pip install -q -r requirements/lmeval.txt; fi
    echo "$want" > "$stamp"
fi
