"""The provenance block every results file records: what produced the numbers.

A figure read months later says nothing unless the file says which code, machine and settings
made it; thread count and ``OMP_WAIT_POLICY`` change step times (docs/RESULTS.md) and, for some
kernels, results, so they are recorded with the rest. ``lib.report.write_report`` adds the block
to every report; ``_suite.Runs`` adds it to every cached run.

``dirty`` is about the code that measures: a tracked change, or an untracked file, under
``CODE_PATHS``. Changes under ``docs/`` (results being regenerated) do not make a run dirty.
"""
from __future__ import annotations

import os
import subprocess

from _machine import cpu_model

from . import ROOT

CODE_PATHS = ("src", "bench", "scripts", "pyproject.toml")
KEYS = ("commit", "dirty", "dirty_paths", "cpu_model", "gpu", "torch", "threads", "omp_wait_policy",
        "dtype", "seed")
MAX_DIRTY_PATHS = 20


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state() -> tuple[str | None, bool | None, list[str]]:
    """(full HEAD sha, whether the code differs from it, the differing paths); (None, None, [])
    outside a git checkout."""
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return None, None, []
    status = _git("status", "--porcelain", "--", *CODE_PATHS) or ""
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return sha.strip(), bool(paths), paths[:MAX_DIRTY_PATHS]


def gpu_name(device: str | None) -> str | None:
    """The CUDA device's name when ``device`` is a CUDA device, or (no device given) when this
    process already uses CUDA; None otherwise. Never initialises CUDA for a CPU run (some
    benchmarks fork afterwards)."""
    import torch

    if device is not None and not str(device).startswith("cuda"):
        return None
    if device is None and not torch.cuda.is_initialized():
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def provenance(dtype: str | None, seed, *, device: str | None = None, threads: int | None = None) -> dict:
    """The block, keys in ``KEYS`` order. ``dtype``: the model's dtype name (None where no model
    is run); ``seed``: the seed(s) the run's random draws start from (an int, a list for several
    seeds, None where nothing is drawn); ``threads``: torch threads of the measuring processes
    when they are not this one (default: this process's ``torch.get_num_threads()``)."""
    import torch

    sha, dirty, paths = git_state()
    return {
        "commit": sha, "dirty": dirty, "dirty_paths": paths, "cpu_model": cpu_model(),
        "gpu": gpu_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset (spin)",
        "dtype": dtype, "seed": seed,
    }


def summary(p: dict) -> str:
    """The block in one Markdown line, for the end of a report."""
    commit = (p["commit"] or "unknown")[:12] + (" (dirty)" if p["dirty"] else "")
    gpu = f", GPU {p['gpu']}" if p.get("gpu") else ""
    return (f"Provenance: commit {commit}, CPU {p['cpu_model']}{gpu}, torch {p['torch']}, {p['threads']} torch "
            f"threads, OMP_WAIT_POLICY {p['omp_wait_policy']}, dtype {p['dtype']}, seed {p['seed']}.")
