"""GIFT-SW adapters: the salient indices and trained columns only, tied to their base model.

An adapter folder holds ``adapter_config.json`` (format, GIFT-SW config, per-layer shapes, the
base model's fingerprint) and ``adapter_model.safetensors`` (per layer ``<name>.salient_idx``,
``<name>.salient_weight``, ``<name>.noise_std``): about k/in of the targeted weights.

The fingerprint is a SHA-256 over the targeted layers' names, shapes and base weights rounded
to bf16 - so the same base loaded in fp32 or bf16 matches, while a different (or merged) base
is refused instead of silently receiving columns trained for another model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_dir
from ..targets import target_weight
from .config import GiftConfig
from .layer import SalientLinear
from .model import apply_gift, gift_layers

ADAPTER_FORMAT = "salientft-gift"
ADAPTER_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of (name, shape, bf16 bytes) of each (out, in) base weight, in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        b = w.to(torch.bfloat16).contiguous().cpu().view(torch.int16)
        h.update(b.numpy().tobytes())
    return h.hexdigest()


def _base_weights(layers: dict[str, SalientLinear]) -> dict[str, torch.Tensor]:
    return {n: m.base_weight() for n, m in layers.items()}


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter of a GIFT-SW model into ``directory`` (atomically) and return its path."""
    from safetensors.torch import save_file

    layers = gift_layers(model)
    if not layers:
        raise ValueError("model has no GIFT-SW layers: apply_gift() it before save_adapter()")
    config = getattr(model, "salientft_gift_config", None) or GiftConfig()
    tensors, modules = {}, {}
    for name, m in layers.items():
        tensors[f"{name}.salient_idx"] = m.salient_idx.detach().cpu().contiguous()
        tensors[f"{name}.salient_weight"] = m.salient_weight.detach().cpu().contiguous()
        tensors[f"{name}.noise_std"] = m.noise_std.detach().cpu().contiguous()
        modules[name] = {"in_features": m.in_features, "out_features": m.out_features, "k": m.k}
        if getattr(m, "num_experts", None) is not None:  # a fused expert projection: tensors per expert
            modules[name]["experts"] = m.num_experts
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base_model": base_model or getattr(getattr(model, "config", None), "_name_or_path", None),
        "base_fingerprint": fingerprint(_base_weights(layers)),
        "gift_config": config.to_dict(),
        "modules": modules,
    }
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": ADAPTER_FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder; errors name the file and what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{directory} is not a salientft adapter: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is corrupt (not valid JSON: {e}); re-save the adapter") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        kind = meta.get("peft_type") if isinstance(meta, dict) else None
        hint = f" (it looks like a PEFT {kind} adapter: load it with peft.PeftModel)" if kind else ""
        raise ValueError(f"{cfg_path} is not a salientft GIFT-SW adapter{hint}")
    if meta.get("version", 0) > ADAPTER_VERSION:
        raise ValueError(f"{cfg_path} has adapter version {meta['version']}; upgrade salientft to read it")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{w_path} is corrupt or truncated ({e}); re-save the adapter") from None
    for name, shape in meta.get("modules", {}).items():
        for key in ("salient_idx", "salient_weight", "noise_std"):
            if f"{name}.{key}" not in tensors:
                raise ValueError(f"{w_path} lacks {name}.{key}: the adapter is incomplete")
        sw, lead = tensors[f"{name}.salient_weight"], ((shape["experts"],) if "experts" in shape else ())
        if (tuple(sw.shape) != (*lead, shape["out_features"], shape["k"])
                or tuple(tensors[f"{name}.salient_idx"].shape)[-1:] != (shape["k"],)
                or tensors[f"{name}.salient_idx"].numel() != shape["k"] * (lead[0] if lead else 1)):
            raise ValueError(f"{w_path}: {name} tensors do not match the shapes in {CONFIG_NAME}")
    return meta, tensors


def load_adapter(base_model: nn.Module, directory: str | Path, *, check_base: bool = True) -> nn.Module:
    """Apply a saved GIFT-SW adapter to a fresh base model, in place, and return it.

    Refuses a base whose targeted weights differ from those the adapter was trained on
    (``check_base=False`` skips the check, at your own risk).
    """
    meta, tensors = read_adapter(directory)
    config = GiftConfig.from_dict(meta["gift_config"])
    modules = meta["modules"]
    named = {}
    for n in modules:
        try:
            named[n] = target_weight(base_model, n)  # (out, in), or [experts, out, in] of fused experts
        except (AttributeError, TypeError):
            pass
    missing = [n for n in modules if n not in named]
    if missing:
        raise ValueError(
            f"adapter {directory} was saved for a different base model: it targets {missing[0]!r}, "
            f"which this model does not have (base was {meta.get('base_model')!r})"
        )
    for n, s in modules.items():
        shape = tuple(named[n].shape)
        if shape != ((s["experts"],) if "experts" in s else ()) + (s["out_features"], s["in_features"]):
            raise ValueError(
                f"adapter {directory} was saved for a different base model: {n} is {shape} here but "
                f"({s['out_features']}, {s['in_features']}) in the adapter (base was {meta.get('base_model')!r})"
            )
    if check_base:
        fp = fingerprint({n: named[n] for n in modules})
        if fp != meta.get("base_fingerprint"):
            raise ValueError(
                f"adapter {directory} was trained on different base weights (fingerprint mismatch; "
                f"its base was {meta.get('base_model')!r}). Load the same base model it was trained "
                "from (not a merged or other fine-tuned copy); to force it anyway: salientft eval --no-check-base, "
                "or check_base=False in Python"
            )
    cfg = GiftConfig.from_dict({**config.to_dict(), "target_modules": list(modules)})
    idx = {n: tensors[f"{n}.salient_idx"] for n in modules}
    stds = {n: tensors[f"{n}.noise_std"] for n in modules}
    apply_gift(base_model, cfg, salient_idx=idx, noise_std=stds)
    layers = gift_layers(base_model)
    with torch.no_grad():
        for n, layer in layers.items():
            layer.salient_weight.copy_(tensors[f"{n}.salient_weight"].to(layer.salient_weight.dtype))
    base_model.salientft_gift_config = config
    return base_model
