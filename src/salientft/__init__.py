"""salientft: fine-tune large language models by training only their salient weights."""
from .config import GiftConfig
from .gift import (
    SalientLinear,
    apply_gift,
    load_adapter,
    merge_gift,
    save_adapter,
    trainable_parameters,
    unmerge_gift,
)
from .models import load_model
from .quant.grid import quantize_rows

__version__ = "0.1.0"

__all__ = [
    "GiftConfig",
    "SalientLinear",
    "apply_gift",
    "load_adapter",
    "merge_gift",
    "save_adapter",
    "trainable_parameters",
    "unmerge_gift",
    "load_model",
    "quantize_rows",
]
