"""Full state of a model sharded by FSDP2 (``fully_shard``: DTensor parameters), for the methods'
checkpoints and outputs. See docs/distributed.md.

Under FSDP2 a parameter outside forward/backward is a DTensor holding only this rank's rows;
in-place edits such as ``index_copy_`` on it raise, and a file written from it would hold a
shard. ``gathered(model)`` all-gathers every sharded parameter once (a collective: every rank
must enter it, in the same order), swaps the full tensors in for the duration of the block and
puts the shards back on exit; ``load_full_`` writes a full tensor read from a checkpoint into
a parameter, sharded or not (each rank keeps its own rows, no communication).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _is_dtensor(t) -> bool:
    return type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "full_tensor")


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is a DTensor (FSDP2)."""
    return any(_is_dtensor(p) for p in model.parameters())


def is_writer() -> bool:
    """Rank 0 of an initialised process group, or a single process: the one that writes files."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextmanager
def gathered(model: nn.Module):
    """Inside the block every DTensor parameter of ``model`` is replaced by a plain Parameter
    holding the full tensor (same ``requires_grad``; tied parameters stay tied); restored on exit.
    A no-op for an unsharded model. Collective: call it on every rank. Edits made inside the
    block to the full tensors are not written back to the shards.
    """
    if not is_sharded(model):
        yield model
        return
    full: dict[int, nn.Parameter] = {}
    swapped = []
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not _is_dtensor(p):
                    continue
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                swapped.append((module, name, p))
                module._parameters[name] = full[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


@torch.no_grad()
def load_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a full ``value``, also when ``param`` is a DTensor shard."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=param.to_local().device, dtype=param.dtype)
        local = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(value)
