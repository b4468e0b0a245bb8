"""Resolve what ``salientft eval --model`` names into a (model, tokenizer) ready to score.

Accepted: everything :func:`salientft.models.load_model` takes (presets, HF folders, hub ids), and
a trained run's output directory: ``run_config.json`` (key ``"model"`` names the base) plus either
``model/`` or ``merged/`` (a full HF model folder) or ``adapter/`` (a salientft GIFT-SW adapter, or
a PEFT adapter recognised by ``adapter_config.json`` with ``"peft_type"``). ``adapter`` may also be
given explicitly, on top of any base.
"""
from __future__ import annotations

import json
from pathlib import Path


def _is_peft_adapter(directory: Path) -> bool:
    cfg = directory / "adapter_config.json"
    if not cfg.is_file():
        return False
    try:
        return "peft_type" in json.loads(cfg.read_text())
    except ValueError:
        return False


def attach_adapter(model, directory: str | Path):
    """Apply a salientft adapter in place, or wrap the model with a PEFT adapter; returns the model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    if _is_peft_adapter(directory):
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError(f"{directory} is a PEFT adapter: pip install 'salientft[peft]'") from None
        kwargs = {}
        from ..quant.layer import QuantizedSalientLinear

        if any(isinstance(m, QuantizedSalientLinear) for m in model.modules()):
            from peft import LoraConfig

            from ..quant.ste import register_quantized_lora

            kwargs["config"] = register_quantized_lora(LoraConfig.from_pretrained(str(directory)))
        return PeftModel.from_pretrained(model, str(directory), is_trainable=False, **kwargs).eval()
    from ..gift.adapter import load_adapter  # lazy: only runs need it

    return load_adapter(model, directory).eval()


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "run_config.json").is_file() and any((p / d).is_dir() for d in ("model", "merged", "adapter"))


def load_for_eval(model: str, adapter: str | Path | None = None, dtype="bf16", device=None):
    """Return ``(model, tokenizer, description)`` for a preset, path, hub id or run directory."""
    from ..models import load_model

    path = Path(str(model))
    if path.is_dir() and (path / "run_config.json").is_file():
        run_cfg = json.loads((path / "run_config.json").read_text())
        full = next((path / d for d in ("model", "merged") if (path / d / "config.json").is_file()), None)
        if full is not None:
            m, tok = load_model(str(full), dtype=dtype, device=device)
            desc = f"{path} (full model {full.name}/)"
        elif (path / "adapter").is_dir():
            base = run_cfg.get("quantized") or run_cfg.get("model")
            if not base:
                raise ValueError(f"{path / 'run_config.json'} has no \"model\" key naming the base model")
            m, tok = load_model(base, dtype=dtype, device=device)
            m = attach_adapter(m, path / "adapter")
            desc = f"{path} (adapter on {base})"
        else:
            raise FileNotFoundError(
                f"{path} has run_config.json but no model/, merged/ or adapter/: the run did not finish saving"
            )
    else:
        m, tok = load_model(str(model), dtype=dtype, device=device)
        desc = str(model)
    if adapter is not None:
        m = attach_adapter(m, adapter)
        desc += f" + adapter {adapter}"
    m.eval()
    return m, tok, desc
