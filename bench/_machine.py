"""What a benchmark report records about the machine it ran on, gathered in one place.

``machine_info()`` returns every fact in ``FACTS`` (CPU model, cores, torch threads, versions,
memory, load, commit). A report that records only some of them, under its own keys, names
them: ``machine_info("python", "cpus=cpu_count", "processor")`` gives them in that order,
``"key=fact"`` storing a fact under another key, so every report keeps the keys it has always
written. Facts are read when asked for (a git call for ``commit``, an import for a version).
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from _memory import meminfo_bytes

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("transformers", "peft")  # left out of the result when not installed


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def git_commit() -> str | None:
    """The repository's short HEAD commit, None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


FACTS = {
    "cpu_model": cpu_model,
    "cpu_count": os.cpu_count,
    "cpu_affinity": lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "threads": _torch_threads,
    "torch": lambda: _version("torch"),
    "transformers": lambda: _version("transformers"),
    "peft": lambda: _version("peft"),
    "python": platform.python_version,
    "platform": platform.platform,
    "processor": lambda: platform.processor() or platform.machine(),
    "mem_total_gib": lambda: round(meminfo_bytes("MemTotal") / 2**30, 1),
    "mem_available_gib": lambda: round(meminfo_bytes("MemAvailable") / 2**30, 1),
    "load_avg_1m": lambda: round(os.getloadavg()[0], 2),
    "commit": git_commit,
    # torch's OpenMP threads spin between parallel regions unless told otherwise; that decides how
    # fast GIFT-SW's noise-drawing threads run (ops/noise.py), so every step timing records it
    "omp_wait_policy": lambda: os.environ.get("OMP_WAIT_POLICY") or "unset (spin)",
}


def machine_info(*names: str) -> dict:
    """{key: fact} for ``names`` ("fact" or "key=fact"), in order; every fact when none are given."""
    info = {}
    for name in names or tuple(FACTS):
        key, _, fact = name.partition("=")
        fact = fact or key
        if fact not in FACTS:
            raise KeyError(f"unknown machine fact {fact!r}; known: {', '.join(FACTS)}")
        value = FACTS[fact]()
        if value is None and fact in OPTIONAL:
            continue
        info[key] = value
    return info
