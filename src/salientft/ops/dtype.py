"""The dtype a layer computes in: the autocast dtype when autocast is on, else the input's."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """``torch.get_autocast_dtype`` under autocast on ``x``'s device, else ``x.dtype``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
