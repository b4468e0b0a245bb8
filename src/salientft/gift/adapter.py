"""GIFT-SW adapters: the salient indices and trained columns only, tied to their base model.

One format for every writer (``save_adapter``, ``salientft train``, PEFT's ``save_pretrained`` on a
``GiftSWConfig`` model): a PEFT adapter folder (``"peft_type": "GIFT_SW"``; see
``salientft.adapter_format``), so ``PeftModel.from_pretrained(base, folder)`` loads it once
``salientft`` is imported, and salientft loads it without PEFT installed. Per layer
``base_model.model.<name>.giftsw_idx`` / ``.giftsw_weight`` / ``.giftsw_noise_std``: about k/in of
the targeted weights. Version-1 folders (``"format": "salientft-gift"``) are still read.

The fingerprint is a SHA-256 over the targeted layers' names, shapes and base weights rounded
to bf16 - so the same base loaded in fp32 or bf16 matches, while a different (or merged) base
is refused instead of silently receiving columns trained for another model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_dir
from ..adapter_format import (CONFIG_NAME, GIFT_SW, GIFT_SW_V1, IMPORT_HINT, LEGACY_FORMAT, PEFT_PREFIX, PEFT_TYPE,
                              TENSOR_NAMES, WEIGHTS_NAME, adapter_kind)
from ..targets import target_weight
from .config import SETTINGS, GiftConfig
from .layer import SalientLinear
from .model import apply_gift, gift_layers

log = logging.getLogger(__name__)
ADAPTER_FORMAT = LEGACY_FORMAT  # kept for callers of version 1
ADAPTER_VERSION = 2


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of (name, shape, bf16 bytes) of each (out, in) base weight, in name order."""
    return fingerprint_of(weights, weights.__getitem__)


def fingerprint_of(names, weight) -> str:
    """:func:`fingerprint` of the weights ``weight(name)`` for each of ``names``, asked for one at a
    time in name order (so a caller may gather a sharded weight, hash it and free it)."""
    h = hashlib.sha256()
    for name in sorted(names):
        w = weight(name).detach()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        b = w.to(torch.bfloat16).contiguous().cpu().view(torch.int16)
        h.update(b.numpy().tobytes())
        del w, b
    return h.hexdigest()


def _base_weights(layers: dict[str, SalientLinear]) -> dict[str, torch.Tensor]:
    return {n: m.base_weight() for n, m in layers.items()}


def remember_base_fingerprint(model: nn.Module) -> str:
    """Compute the base fingerprint of a GIFT-SW model now and keep it on the model
    (``salientft_base_fingerprint``): every later ``save_adapter`` reuses it instead of hashing the
    targeted weights again, and under FSDP none has to gather them. Call it while the base weights
    are whole and as trained on (``salientft train`` does, before sharding); ``merge_gift`` drops it."""
    model.salientft_base_fingerprint = fingerprint(_base_weights(gift_layers(model)))
    return model.salientft_base_fingerprint


def adapter_config(config: GiftConfig, layers: dict[str, int], base_model: str | None, base_fingerprint: str,
                   in_features: dict[str, int] | None = None) -> dict:
    """The PEFT-format ``adapter_config.json`` of a GIFT-SW adapter with ``layers`` ({name: k}).

    ``base_model_name_or_path`` is what stock tools can load (the embedded model's hub id, a path
    or hub id as given, None for ``tiny-random-llama``); ``salientft_base_model`` keeps salientft's
    own name when it differs. A layer whose k is not the settings' rule gets an exact ``k_pattern``
    entry, so PEFT builds every layer at the saved size.
    """
    from ..models import stock_name

    k_pattern = {}
    for name, k in layers.items():
        try:
            rule = config.k_for(in_features[name], name) if in_features else None
        except ValueError:
            rule = None
        if rule != k:
            k_pattern[re.escape(name)] = k
    stock = stock_name(base_model)
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": stock, "revision": None,
        "inference_mode": True, "target_modules": sorted(layers), "exclude_modules": None,
        **{name: getattr(config, name) for name in SETTINGS}, "k_pattern": k_pattern, "scores": None,
        "modules_to_save": None, "trainable_token_indices": None, "salient_indices_in_adapter": True,
        "base_fingerprint": base_fingerprint,
        "salientft_base_model": base_model if base_model and base_model != stock else None,
    }


def column_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a GIFT-SW model in :func:`read_adapter`'s naming (``<layer>.salient_idx``,
    ``.salient_weight``, ``.noise_std``), copied to the CPU. The trained columns must be whole (under
    FSDP: inside ``methods.sharding.gathered(model, trainable_only=True)``)."""
    return {f"{name}.{key}": getattr(m, key).detach().cpu().clone()
            for name, m in gift_layers(model).items() for key in TENSOR_NAMES}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`column_tensors` in the adapter file's PEFT naming (``<prefix><layer>.giftsw_idx``, ...)."""
    return {f"{PEFT_PREFIX}{key.rpartition('.')[0]}.{TENSOR_NAMES[key.rpartition('.')[2]]}": t
            for key, t in column_tensors(model).items()}


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None, *,
                 base_fingerprint: str | None = None) -> Path:
    """Write the adapter of a GIFT-SW model into ``directory`` (atomically) and return its path.

    ``base_model`` names the base (a preset, folder or hub id; default: the model's
    ``config._name_or_path``). The folder is a PEFT GIFT-SW adapter (module docstring).
    ``base_fingerprint``: the base's fingerprint when the caller has it; else the one kept on the
    model (:func:`remember_base_fingerprint`), else it is computed from the base weights."""
    from safetensors.torch import save_file

    layers = gift_layers(model)
    if not layers:
        raise ValueError("model has no GIFT-SW layers: apply_gift() it before save_adapter()")
    config = getattr(model, "salientft_gift_config", None) or GiftConfig()
    tensors = adapter_tensors(model)
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    fp = (base_fingerprint or getattr(model, "salientft_base_fingerprint", None)
          or fingerprint(_base_weights(layers)))
    meta = adapter_config(config, {n: m.k for n, m in layers.items()}, base_model, fp,
                          {n: m.in_features for n, m in layers.items()})
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(
            "# GIFT-SW adapter (salientft)\n\n"
            f"Base model: {meta['salientft_base_model'] or meta['base_model_name_or_path'] or 'unnamed'}.\n\n"
            f"{IMPORT_HINT}:\n\n```python\nimport salientft\nfrom peft import PeftModel\n"
            "model = PeftModel.from_pretrained(base_model, \"<this folder>\")\n```\n\n"
            "Or `salientft eval --model <base> --adapter <this folder>`; `salientft export <this folder> "
            "--format lora` writes a LoRA adapter that loads without salientft.\n"
        )
    return directory


def _load_tensors(w_path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{w_path} is corrupt or truncated ({e}); re-save the adapter") from None


def _read_v1(directory: Path, meta: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if meta.get("version", 0) > 1:
        raise ValueError(f"{cfg_path} has adapter version {meta['version']}; upgrade salientft to read it")
    tensors = _load_tensors(w_path)
    for name, shape in meta.get("modules", {}).items():
        for key in TENSOR_NAMES:
            if f"{name}.{key}" not in tensors:
                raise ValueError(f"{w_path} lacks {name}.{key}: the adapter is incomplete")
        sw, lead = tensors[f"{name}.salient_weight"], ((shape["experts"],) if "experts" in shape else ())
        if (tuple(sw.shape) != (*lead, shape["out_features"], shape["k"])
                or tuple(tensors[f"{name}.salient_idx"].shape)[-1:] != (shape["k"],)
                or tensors[f"{name}.salient_idx"].numel() != shape["k"] * (lead[0] if lead else 1)):
            raise ValueError(f"{w_path}: {name} tensors do not match the shapes in {CONFIG_NAME}")
    return meta, tensors


def _read_v2(directory: Path, cfg: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT-format GIFT-SW folder as (meta, tensors) in salientft's naming (see read_adapter)."""
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    extra = [k for k in ("modules_to_save", "trainable_token_indices") if cfg.get(k)]
    if extra:
        raise ValueError(f"{directory} also trains {' and '.join(extra)} (a PEFT-route adapter): salientft's loader "
                         f"applies salient columns only; load it with peft.PeftModel.from_pretrained ({IMPORT_HINT})")
    if not w_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete GIFT-SW adapter: it has no {WEIGHTS_NAME}")
    tensors = _renamed(w_path, _load_tensors(w_path))
    modules = {name: _v2_shapes(w_path, tensors, name) for name in dict.fromkeys(
        key.rpartition(".")[0] for key in tensors)}
    try:
        settings = GiftConfig(**{k: cfg[k] for k in SETTINGS if k in cfg}).to_dict()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    meta = {"format": PEFT_TYPE, "version": ADAPTER_VERSION, "base_model": adapter_kind(directory).base_model,
            "base_fingerprint": cfg.get("base_fingerprint"), "gift_config": settings, "modules": modules}
    return meta, tensors


def _renamed(w_path: Path, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PEFT-named tensors of a version-2 file in salientft's naming (``<layer>.salient_idx``, ...);
    refuses a file holding anything else, or nothing."""
    suffix = {theirs: ours for ours, theirs in TENSOR_NAMES.items()}
    tensors, unknown = {}, []
    for key, t in raw.items():
        name, _, last = key.removeprefix(PEFT_PREFIX).rpartition(".")
        if not key.startswith(PEFT_PREFIX) or last not in suffix:
            unknown.append(key)
            continue
        tensors[f"{name}.{suffix[last]}"] = t
    if unknown:
        raise ValueError(f"{w_path} holds tensors that are not GIFT-SW columns ({unknown[0]}, ...): load it with "
                         f"peft.PeftModel.from_pretrained ({IMPORT_HINT})")
    if not tensors:
        raise ValueError(f"{w_path} holds no GIFT-SW layer: the adapter is empty or incomplete")
    return tensors


def _v2_shapes(w_path: Path, tensors: dict[str, torch.Tensor], name: str) -> dict:
    """Layer ``name``'s entry of ``meta["modules"]``, its three tensors checked present and consistent."""
    for key in TENSOR_NAMES:
        if f"{name}.{key}" not in tensors:
            raise ValueError(f"{w_path} lacks {name}'s {TENSOR_NAMES[key]}: the adapter is incomplete")
    sw, idx = tensors[f"{name}.salient_weight"], tensors[f"{name}.salient_idx"]
    std = tensors[f"{name}.noise_std"]
    # a linear layer: (out, k) columns, (k,) indices, (out,) scales; fused MoE experts add a
    # leading expert dimension to each ([E, out, k], [E, k], [E, out])
    lead = tuple(sw.shape[:-2])
    if (sw.dim() not in (2, 3) or tuple(idx.shape) != (*lead, sw.shape[-1])
            or tuple(std.shape) != (*lead, sw.shape[-2])):
        raise ValueError(f"{w_path}: {name}'s tensors have inconsistent shapes (giftsw_weight "
                         f"{tuple(sw.shape)}, giftsw_idx {tuple(idx.shape)}); the adapter is corrupt")
    shape = {"in_features": None, "out_features": sw.shape[-2], "k": sw.shape[-1]}
    if lead:
        shape["experts"] = lead[0]
    return shape


def _checked(w_path, tensors: dict[str, torch.Tensor], modules) -> dict[str, torch.Tensor]:
    """Columns matched to their indices in ascending order (SalientLinear sorts its indices), and
    no NaN/inf: a broken adapter is refused, never loaded as a wrong model."""
    for name in modules:
        idx, sw = tensors[f"{name}.salient_idx"], tensors[f"{name}.salient_weight"]
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"{w_path}: {name}'s indices are {idx.dtype}, not integers; the adapter is corrupt")
        idx = idx.long()  # (k,), or [experts, k] of fused experts: each row on its own
        ordered, order = torch.sort(idx, dim=-1)
        if idx.shape[-1] > 1 and bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError(f"{w_path}: {name} lists a salient column twice; the adapter is corrupt")
        if not torch.equal(ordered, idx):
            idx, sw = ordered, torch.take_along_dim(sw, order.unsqueeze(-2), dim=-1)
        for key, t in (("salient_weight", sw), ("noise_std", tensors[f"{name}.noise_std"])):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{w_path}: {name}'s {key} holds NaN or infinite values (a diverged training?); "
                                 "the adapter is refused")
        tensors[f"{name}.salient_idx"], tensors[f"{name}.salient_weight"] = idx, sw
    return tensors


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a GIFT-SW adapter folder of either format (and origin).

    Returns ``(meta, tensors)``: ``meta`` has ``base_model``, ``base_fingerprint`` (None when the
    writer recorded none), ``gift_config`` (the settings) and ``modules`` ({name: {out_features, k,
    in_features (None if unrecorded)}}); ``tensors`` maps ``<name>.salient_idx`` (ascending),
    ``<name>.salient_weight`` (the columns in that order) and ``<name>.noise_std``. Errors name the
    file and what is wrong with it."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not a GIFT-SW adapter: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    kind = adapter_kind(directory)
    if kind.kind == GIFT_SW:
        meta, tensors = _read_v2(directory, kind.config)
    elif kind.kind == GIFT_SW_V1:
        meta, tensors = _read_v1(directory, kind.config)
    else:
        raise ValueError(f"{directory / CONFIG_NAME} is not a GIFT-SW adapter (it looks like a PEFT "
                         f"{kind.peft_type} adapter: load it with peft.PeftModel)")
    return meta, _checked(directory / WEIGHTS_NAME, tensors, meta["modules"])


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
        shape = tuple(named[n].shape)  # (out, in), or [experts, out, in] of fused experts
        lead = (s["experts"],) if "experts" in s else ()
        in_f = s["in_features"] if s["in_features"] is not None else shape[-1]
        top = int(tensors[f"{n}.salient_idx"].max())
        if (shape != (*lead, s["out_features"], in_f) or top >= shape[-1]
                or int(tensors[f"{n}.salient_idx"].min()) < 0):
            raise ValueError(
                f"adapter {directory} was saved for a different base model: {n} is {shape} here but "
                f"({s['out_features']}, {s['in_features'] or f'> {top}'}) in the adapter "
                f"(base was {meta.get('base_model')!r})"
            )
    fp = None
    if check_base and meta.get("base_fingerprint") is None:
        log.warning("adapter %s records no base fingerprint (written by an earlier salientft's PEFT route): "
                    "the base weights cannot be checked", directory)
    elif check_base:
        fp = fingerprint({n: named[n] for n in modules})
        if fp != meta.get("base_fingerprint"):
            raise ValueError(
                f"adapter {directory} was trained on different base weights (fingerprint mismatch; "
                f"its base was {meta.get('base_model')!r}). Load the same base model it was trained "
                "from (not a merged or other fine-tuned copy); to force it anyway: salientft eval --no-check-base, "
                "or check_base=False in Python"
            )
    return attach_columns(base_model, config, tensors, list(modules), fp)


def attach_columns(base_model: nn.Module, config: GiftConfig, tensors: dict[str, torch.Tensor],
                   names: list[str], base_fingerprint: str | None = None) -> nn.Module:
    """GIFT-SW layers on ``names`` of ``base_model`` (in place) with the given indices, noise scales
    and trained columns (``tensors`` in :func:`read_adapter`'s naming): an adapter applied without
    computing any score or noise scale. ``base_fingerprint``, when known, is kept on the model."""
    cfg = GiftConfig.from_dict({**config.to_dict(), "target_modules": list(names)})
    idx = {n: tensors[f"{n}.salient_idx"] for n in names}
    stds = {n: tensors[f"{n}.noise_std"] for n in names}
    apply_gift(base_model, cfg, salient_idx=idx, noise_std=stds)
    layers = gift_layers(base_model)
    with torch.no_grad():
        for n, layer in layers.items():
            layer.salient_weight.copy_(tensors[f"{n}.salient_weight"].to(layer.salient_weight.dtype))
    base_model.salientft_gift_config = config
    if base_fingerprint is not None:
        base_model.salientft_base_fingerprint = base_fingerprint
    return base_model
