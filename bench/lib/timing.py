"""The interleaved timing loop every speed benchmark uses.

On a machine shared with other jobs, load comes and goes; timing one method after another
would charge it to whichever ran then. ``interleave`` runs one call of every key per round, the
starting key rotating each round, after untimed warm-up calls, so load hits every key alike and
per-round ratios (``lib.stats.round_ratio``) compare keys that shared a round.

What a round records is the clock's reading of the call: ``wall_ms`` (perf_counter), ``cpu_ms``
(this process's CPU time: robust to other processes on the machine), ``CudaTimer`` (CUDA events,
no host sync inside the call), or ``returned`` (the call times itself and returns its reading,
e.g. a (forward, backward, optimizer) tuple).
"""
from __future__ import annotations

import sys
import time


def rotation(keys: list, r: int) -> list:
    """``keys`` in round ``r``'s order: starting at key ``r mod len(keys)``."""
    i = r % len(keys)
    return keys[i:] + keys[:i]


def _clock_ms(clock):
    def measure(fn) -> float:
        t0 = clock()
        fn()
        return (clock() - t0) * 1000
    return measure


wall_ms = _clock_ms(time.perf_counter)
cpu_ms = _clock_ms(time.process_time)


def returned(fn):
    """The call's own reading (its return value)."""
    return fn()


class CudaTimer:
    """ms of a call by CUDA events around it; ``sync=True`` also synchronizes before and after, so a
    call that returns its own host-side reading (``returned``) sees the device's work."""

    def __init__(self, measure=None, sync: bool = False):
        self.measure, self.sync = measure, sync

    def __call__(self, fn):
        import torch

        torch.cuda.synchronize()
        if self.measure is not None:  # the call's own reading, between two syncs
            value = self.measure(fn)
            torch.cuda.synchronize()
            return value
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def clock_for(device: str, measure=wall_ms):
    """``measure`` on CPU; on CUDA, CUDA events (``measure=wall_ms``) or ``measure`` between syncs."""
    if not str(device).startswith("cuda"):
        return measure
    return CudaTimer(None if measure is wall_ms else measure)


def interleave(work: dict, rounds: int, warmup: int = 1, measure=wall_ms, progress: str | None = None,
               on_round=None) -> dict:
    """{key: [measure(work[key]) per round]}.

    ``work``: key -> a callable with no arguments (one step). ``warmup`` untimed calls of each key
    first (allocates optimizer states, primes kernels). ``progress``: a tqdm bar's label on stderr.
    ``on_round(r, times)``: called after each round (e.g. to print it).
    """
    keys = list(work)
    for k in keys:
        for _ in range(warmup):
            work[k]()
    times = {k: [] for k in keys}
    rng = range(rounds)
    if progress is not None:
        from tqdm import tqdm

        rng = tqdm(rng, desc=progress, file=sys.stderr)
    for r in rng:
        for k in rotation(keys, r):
            times[k].append(measure(work[k]))
        if on_round is not None:
            on_round(r, times)
    return times
