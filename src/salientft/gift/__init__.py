"""GIFT-SW: salient-column layers, applying them to a model, adapters and merging."""
from .config import GiftConfig
from .adapter import fingerprint, load_adapter, read_adapter, save_adapter
from .layer import SalientLinear
from .model import apply_gift, gift_layers, merge_gift, noise_std_for, trainable_parameters, unmerge_gift

__all__ = [
    "GiftConfig",
    "SalientLinear", "apply_gift", "merge_gift", "unmerge_gift", "trainable_parameters",
    "gift_layers", "noise_std_for", "save_adapter", "load_adapter", "read_adapter", "fingerprint",
]
