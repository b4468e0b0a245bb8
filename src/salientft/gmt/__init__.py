"""Gradient-Mask Tuning (GMT, docs/methods.md#gmt): before each optimizer step keep only the largest
accumulated gradient entries and zero the rest, with an exact threshold (docs/gmt.md).

- ``config.py``: ``GMTConfig`` (ratio, granularity, mode, exclude) and the excluded roles.
- ``select.py``: the exact selection kernels (radix select on the float bits, ties by position),
  host and device forms.
- ``strategies.py``: the threshold strategies, one chosen per mask: per tensor or global on the
  host, the device engine (no host sync per tensor), sharded under FSDP2.
- ``stats.py``: the per-step statistics (kept on the device by the device engine until read).
- ``mask.py``: ``GradientMask`` (which parameters, apply, step).
- ``strict.py``: strict mode's compact copy of the masked entries across the optimizer step.
- ``callback.py``: ``GradientMaskCallback`` for the Hugging Face Trainer, built on first use so
  that a plain PyTorch loop does not import transformers.
"""
from .callback import _refuse_unsupported_sharding  # noqa: F401  (tests/test_distributed.py)
from .config import GMT_DEFAULT_EXCLUDE, ROLES, GMTConfig
from .mask import GradientMask, build_gradient_mask
from .stats import resolve_all
from .strict import StrictSnapshot

__all__ = [
    "GMTConfig", "GMT_DEFAULT_EXCLUDE", "ROLES", "GradientMask", "GradientMaskCallback", "StrictSnapshot",
    "build_gradient_mask", "resolve_all",
]


def __getattr__(name):
    # The Trainer callback is built on first use so that importing salientft.gmt (and a plain
    # PyTorch loop) does not import transformers.
    if name == "GradientMaskCallback":
        from .callback import _make_callback_class

        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
