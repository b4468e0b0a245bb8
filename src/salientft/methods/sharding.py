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

import logging
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
def gathered(model: nn.Module, trainable_only: bool = False):
    """Inside the block every DTensor parameter of ``model`` is replaced by a plain Parameter
    holding the full tensor (same ``requires_grad``; tied parameters stay tied); restored on exit.
    ``trainable_only``: only the parameters with ``requires_grad`` (the frozen rest stays sharded).
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
                if p is None or not _is_dtensor(p) or (trainable_only and not p.requires_grad):
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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def base_fingerprint(model: nn.Module) -> str:
    """The GIFT-SW adapter's base fingerprint of ``model`` (``gift.adapter.fingerprint`` of its
    targeted base weights), kept on the model as ``salientft_base_fingerprint`` once computed.

    ``salientft train`` computes it before FSDP shards the model (``GiftSW.prepare``), so no save
    gathers or hashes the base again. Sharded without it (a model sharded by hand), every rank
    gathers one targeted weight at a time, hashes it and frees it (a collective: call it on every
    rank): the same digest as the unsharded model's, never more than one weight gathered.
    """
    fp = getattr(model, "salientft_base_fingerprint", None)
    if fp is None:
        from ..gift import gift_layers
        from ..gift.adapter import fingerprint_of

        layers = gift_layers(model)
        fp = fingerprint_of(layers, lambda name: full_tensor(layers[name].base_weight()))
        model.salientft_base_fingerprint = fp
    return fp


def computed_once(compute, device: torch.device | None = None):
    """``compute()`` on rank 0 only, its result handed to every rank (``broadcast_object_list``:
    the same scores on every rank, one calibration per run); in one process just ``compute()``.
    Tensors in the result come back on the CPU.

    Under torchrun (``WORLD_SIZE`` > 1) before the Trainer has started the process group, it is
    started here the way the Trainer's accelerate starts it (``PartialState``; gloo for a run on
    ``device`` CPU, the accelerator's backend otherwise), and the Trainer then reuses it."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=device is not None and torch.device(device).type == "cpu")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    box = [None]
    if dist.get_rank() == 0:
        box[0] = _to_cpu(compute())
    dist.broadcast_object_list(box, src=0)
    logging.getLogger(__name__).info("computed on rank 0, received on rank %d of %d", dist.get_rank(),
                                     dist.get_world_size())
    return box[0]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def own_fsdp_checkpoint(trainer, output_dir, internal: bool) -> bool:
    """The Trainer's ``save_model`` of a checkpoint under FSDP, when the method writes its own:
    every rank calls the method's ``save_checkpoint`` (GIFT-SW: the trained columns gathered, rank 0
    writes the adapter) and the Trainer's own save, which gathers the whole model's state dict
    first, is skipped (True). False: let the Trainer save (not FSDP, not a checkpoint, or a method
    that relies on the Trainer's checkpoint)."""
    if not (internal and trainer.is_fsdp_enabled):
        return False
    from pathlib import Path

    return bool(trainer.salientft_method.save_checkpoint(trainer.model, Path(output_dir or trainer.args.output_dir)))


@contextmanager
def without_fsdp_model_file(skip: bool):
    """While ``skip``: the Trainer's optimizer save under FSDP leaves out ``pytorch_model_fsdp.bin``
    (accelerate's ``save_fsdp_model``: the whole model gathered and written), which a method that
    writes and reads its own checkpoint never reads; the optimizer and scheduler are saved as usual."""
    import transformers.trainer as hf_trainer

    saved = getattr(hf_trainer, "save_fsdp_model", None)
    if not skip or saved is None:  # a transformers that saves otherwise: its file is written, still correct
        yield
        return
    hf_trainer.save_fsdp_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        hf_trainer.save_fsdp_model = saved
