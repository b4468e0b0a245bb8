#!/usr/bin/env bash
# The main-job command of the README's quick start: set up, then fine-tune the embedded
# SmolLM2-135M on the embedded instruction mix with GIFT-SW and report before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# A rerun replaces the previous quick-start run (salientft train refuses to mix two runs in one
# folder); with --resume (or an explicit --overwrite) the caller decides.
fresh=(--overwrite)
for a in "$@"; do case "$a" in --resume|--overwrite) fresh=() ;; esac; done
# GIFT-SW's weight noise is drawn by a thread pool between torch's matmuls; torch's OpenMP threads
# would spin meanwhile and take a core from it (docs/results/noise_speed.md). Only the environment
# of a process can change that, before torch loads; a caller's own setting wins.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# The base model measured before training (held-out loss, six-task evaluation) ships with the
# repository as measure-cache entries (scripts/quickstart_measures.py): read when their key matches
# (the same weights, settings, measuring code and torch), else measured as usual (docs/evaluation.md).
export SALIENTFT_MEASURE_SEED="${SALIENTFT_MEASURE_SEED:-$PWD/configs/quickstart_measures}"
exec salientft train --config configs/quickstart.yaml "${fresh[@]}" "$@"
