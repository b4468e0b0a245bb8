"""Peak memory of a benchmark process, read from the kernel (Linux /proc): the one mechanism every
benchmark uses (bench/step.py's memory worker, bench/scaling.py's timing process).

On CPU, torch's allocator memory is invisible to tracemalloc, so we read the process's resident
set: ``VmRSS`` (now) and ``VmHWM`` (its high-water mark) from /proc/self/status; writing 5 to
/proc/self/clear_refs resets the high-water mark to the current RSS. glibc's adaptive mmap
threshold is pinned (``MALLOC_ENV`` in a fresh process's environment, ``pin_malloc()`` after a
fork) so that large freed blocks go back to the kernel instead of being silently reused, which
would hide a peak.
"""
from __future__ import annotations

from pathlib import Path

# glibc: large blocks always mmap'ed and freed memory trimmed, so a freed block is not silently
# reused (which would hide a peak). Set in a worker's environment before it starts.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def status_kb(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """The process's resident set now."""
    return status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set (since it started, or since the last ``reset_peak_rss()``)."""
    return status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) to the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def meminfo_bytes(field: str) -> int:
    """A field of /proc/meminfo (MemTotal, MemAvailable, ...) in bytes; 0 if absent."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def pin_malloc() -> None:
    """What ``MALLOC_ENV`` does at process start, done with mallopt (after a fork)."""
    import ctypes

    libc = ctypes.CDLL(None)
    opts = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # M_TRIM_/M_MMAP_THRESHOLD
    for env, opt in opts.items():
        libc.mallopt(opt, int(MALLOC_ENV[env]))
