"""``GradientMaskCallback``: GMT in the Hugging Face Trainer (mask after accumulation, then clip,
then step). The class derives from transformers' ``TrainerCallback``, so it is built on first use
(``salientft.gmt.GradientMaskCallback``): importing GMT for a plain loop does not import transformers.
"""
from __future__ import annotations

import statistics

import torch

from .config import GMTConfig
from .mask import GradientMask
from .stats import resolve_all


def _refuse_unsupported_sharding(args, model) -> None:
    """GMT's thresholds are exact across the shards of FSDP2 (DTensor gradients); DeepSpeed and
    FSDP1 hand the optimizer flat per-rank shards without the layout the selection needs."""
    if getattr(args, "deepspeed", None):
        raise NotImplementedError(
            "GMT does not support DeepSpeed (its gradients are flat per-rank partitions, so the "
            "threshold would be per shard); use FSDP2 (fsdp_version: 2), DDP or a single process"
        )
    fsdp1 = bool(getattr(args, "fsdp", None)) and int((getattr(args, "fsdp_config", None) or {}).get("version", 2)) != 2
    if not fsdp1 and model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    if fsdp1:
        raise NotImplementedError(
            "GMT does not support FSDP1 (flat parameters: the threshold would be per shard); "
            "use FSDP2 (fsdp_version: 2 in the accelerate config, or --fsdp), DDP or a single process"
        )


def _record(record: dict, stats: dict, norm) -> dict:
    """A step's history record from its statistics and its clipping norm (None: no clipping)."""
    record["kept_fraction"] = stats["kept_fraction"]
    th = stats["threshold"]
    if isinstance(th, dict):
        record["mask_threshold_median"] = statistics.median(th.values()) if th else 0.0
    elif th is not None:
        record["mask_threshold"] = th
    if norm is not None:
        record["masked_grad_norm"] = norm
    return record


def _means(records: list[dict]) -> dict:
    """Each logged key's mean over ``records`` (the steps since the last log)."""
    out = {}
    for key in records[-1]:
        if key != "step":
            vals = [r[key] for r in records if key in r]
            out[key] = sum(vals) / len(vals)
    return out


class _GradientMaskCallback:
    """Hugging Face Trainer integration of GMT: mask after accumulation, then clip, then step.

    The Trainer clips gradients *before* ``on_pre_optimizer_step``, but the mask must come
    first so that clipping acts on what is applied. So at train begin the callback takes over
    clipping: it sets ``args.max_grad_norm`` to 0 (the Trainer then only measures the
    pre-mask norm, logged as ``grad_norm``), and in ``on_pre_optimizer_step`` masks and clips
    with the original max norm (restored at train end). Per optimizer step it records the
    stats in ``history``; every Trainer log gets ``kept_fraction`` (mean since the last log)
    and ``mask_threshold`` (global) or ``mask_threshold_median`` (per tensor). On an
    accelerator the statistics and norms stay on the device until the next log (or train
    end), then are read at once: ``history`` is complete at each log, not at each step.

    Give a GradientMask, or a GMTConfig (the mask is then built on the Trainer's model when
    training starts).
    """

    def __init__(self, mask_or_config: GradientMask | GMTConfig):
        if not isinstance(mask_or_config, (GradientMask, GMTConfig)):
            raise TypeError("GradientMaskCallback needs a GradientMask or a GMTConfig")
        self.mask = mask_or_config if isinstance(mask_or_config, GradientMask) else None
        self.config = mask_or_config.config if self.mask is not None else mask_or_config
        self.history: list[dict] = []
        self._since_log: list[dict] = []
        self._unread: list[tuple[dict, object, object]] = []  # (record, stats, norm) on the device
        self._max_grad_norm = 0.0
        self._snapshot = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _refuse_unsupported_sharding(args, model)
        if self.mask is None:
            self.mask = GradientMask.from_config(model, self.config)
        self._max_grad_norm = float(args.max_grad_norm or 0.0)
        if self._max_grad_norm > 0:
            args.max_grad_norm = 0.0

    def on_train_end(self, args, state, control, **kwargs):
        self._read()
        if self._max_grad_norm > 0:
            args.max_grad_norm = self._max_grad_norm

    def _read(self) -> None:
        """Complete the records of the steps since the last read: one transfer for all stats
        (and one for the clipping norms), however many steps and tensors."""
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        norms = [n for _, _, n in unread if n is not None]
        norms = iter(torch.stack([n.float() for n in norms]).tolist() if norms else [])
        for (record, _, norm), stats in zip(unread, resolve_all([s for _, s, _ in unread])):
            _record(record, stats, next(norms) if norm is not None else None)
            self.history.append(record)
            self._since_log.append(record)

    def _clip(self, model):
        """Clip the masked gradients to the run's max norm; the norm before clipping (on the
        device), or None when the run does not clip."""
        if self._max_grad_norm <= 0:
            return None
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self._max_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a (replicated) DTensor
            norm = norm.full_tensor()
        return norm.detach()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        stats = self.mask._apply_pending()  # no host sync on an accelerator: read at the next log
        norm = self._clip(model)
        self._snapshot = self.mask.snapshot_(optimizer)
        self._unread.append(({"step": state.global_step + 1}, stats, norm))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.mask.restore_(self._snapshot)
        self._snapshot = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        self._read()
        if not self._since_log:
            return
        recs, self._since_log = self._since_log, []
        extra = _means(recs)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def _make_callback_class():
    """``GradientMaskCallback``: the logic above as a transformers ``TrainerCallback``."""
    from transformers import TrainerCallback

    cls = type("GradientMaskCallback", (_GradientMaskCallback, TrainerCallback),
               {"__doc__": _GradientMaskCallback.__doc__, "__module__": "salientft.gmt"})
    cls.__qualname__ = "GradientMaskCallback"
    return cls
