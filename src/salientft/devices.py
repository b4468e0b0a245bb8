"""Which device a command runs on: ``--device`` / ``device=`` resolved and checked before any work.

Accepted: ``auto`` (CUDA when a CUDA device is available, else the CPU), ``cpu``, ``cuda`` and
``cuda:N``. Under torchrun / accelerate launch (``WORLD_SIZE`` > 1) every process uses the GPU of
its ``LOCAL_RANK`` (``auto`` and ``cuda`` give ``cuda:<LOCAL_RANK>``; ``cuda:N`` is refused unless
N is that rank's), so one setting serves every rank; under ``accelerate launch`` with a CPU config
(``ACCELERATE_USE_CPU``) ``auto`` is the CPU. A device that is not there (``cuda`` on a
machine without one, an index past the last GPU) is refused with the fix, before a model loads.
"""
from __future__ import annotations

import os
import platform
import re

import torch

DEVICES_HELP = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N"
_SPEC = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def _world() -> tuple[int, int | None]:
    """(WORLD_SIZE, LOCAL_RANK) as torchrun / accelerate launch set them (1, None when not launched)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = os.environ.get("LOCAL_RANK")
    return world, (int(local) if local not in (None, "") and world > 1 else None)


def check_device_spec(spec, flag: str = "--device") -> str:
    """``spec`` as a normalized string (``auto``, ``cpu``, ``cuda``, ``cuda:N``); raises ValueError
    for anything else. Only the spelling is checked (a config may be written on another machine)."""
    if spec is None:
        return "auto"
    text = str(spec).strip().lower() if isinstance(spec, (str, torch.device)) else None
    if text is None or not _SPEC.fullmatch(text):
        raise ValueError(f"{flag} {spec!r} is not a device: use {DEVICES_HELP}")
    return text


def resolve_device(spec="auto", flag: str = "--device") -> torch.device:
    """The ``torch.device`` a run uses for ``spec`` (see the module docstring); raises ValueError,
    naming the fix, when it is misspelled or absent on this machine."""
    text = check_device_spec(spec, flag)
    world, local_rank = _world()
    # accelerate launch with a CPU config (use_cpu: true) sets ACCELERATE_USE_CPU: auto follows it
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if text == "cpu" or (text == "auto" and (cpu_launch or not torch.cuda.is_available())):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"{flag} {text}: no CUDA device is available (torch {torch.__version__} is {build}); "
                         "use --device cpu, or auto to take a GPU only when there is one")
    count = torch.cuda.device_count()
    m = _SPEC.fullmatch(text)
    index = int(m.group(1)) if m.group(1) is not None else None
    if local_rank is not None:
        if index is not None and index != local_rank:
            raise ValueError(f"{flag} {text}: under torchrun every process uses the GPU of its LOCAL_RANK "
                             f"(this one: cuda:{local_rank}); give --device cuda or auto")
        index = local_rank
    index = 0 if index is None else index
    if index >= count:
        raise ValueError(f"{flag} {text}: this machine has {count} CUDA device{'s' * (count != 1)} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); give one of them")
    return torch.device("cuda", index)


def device_name(device) -> str:
    """A readable name of ``device``: the GPU's model name, or the CPU's (from /proc/cpuinfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def describe_device(device) -> dict:
    """What a run records about its device: ``{"device": "cuda:0", "name": "NVIDIA H100 ..."}``."""
    device = torch.device(device)
    return {"device": str(device), "name": device_name(device)}


def model_device(model) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


__all__ = ["DEVICES_HELP", "check_device_spec", "resolve_device", "device_name", "describe_device", "model_device"]
