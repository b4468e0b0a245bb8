"""GMT's per-step statistics, and the device engine's form of them that stays on the device until read."""
from __future__ import annotations

from .select import _bits_to_float


class _PendingStats:
    """GMT statistics still on the device: ``packed`` (int64) is read with one transfer."""

    def __init__(self, step, names, sizes, packed, per_tensor):
        self.step, self.names, self.sizes, self.packed, self.per_tensor = step, names, sizes, packed, per_tensor

    def resolve(self, values: list[int] | None = None) -> dict:
        v = self.packed.tolist() if values is None else values
        m = len(self.names)
        if self.per_tensor:  # (threshold bits, kept) per tensor
            ts, kept = v[0::2], v[1::2]
            threshold = {n: _bits_to_float(t) for n, t in zip(self.names, ts)}
        else:  # threshold bits, then kept per tensor
            kept = v[1:1 + m]
            threshold = _bits_to_float(v[0])
        return make_stats(self.step, dict(zip(self.names, kept)), sum(self.sizes), threshold)


def make_stats(step: int, kept_per: dict, total: int, threshold, **extra) -> dict:
    """The statistics dict of one ``apply_()`` (see ``GradientMask.last_stats``)."""
    kept = sum(kept_per.values())
    return {"step": step, "kept": kept, "total": total, "kept_fraction": kept / total,
            "threshold": threshold, "kept_per_tensor": kept_per, **extra}


def resolve_all(pending: list) -> list[dict]:
    """Resolve several statistics (dicts pass through) with one device-to-host transfer."""
    import torch

    lazy = [p for p in pending if isinstance(p, _PendingStats)]
    if not lazy:
        return list(pending)
    flat = torch.cat([p.packed for p in lazy]).tolist()
    out, at = [], 0
    for p in pending:
        if isinstance(p, _PendingStats):
            n = p.packed.numel()
            out.append(p.resolve(flat[at:at + n]))
            at += n
        else:
            out.append(p)
    return out
