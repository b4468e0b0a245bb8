"""Resolve what ``salientft eval --model`` names into a (model, tokenizer) ready to score.

Accepted: everything :func:`salientft.models.load_model` takes (presets, HF folders, hub ids), and
a trained run's output directory: ``run_config.json`` (key ``"model"`` names the base) plus either
``model/`` or ``merged/`` (a full HF model folder) or ``adapter/`` (a GIFT-SW adapter of either
origin, loaded by salientft without PEFT, or another PEFT adapter: ``salientft.adapter_format``).
``adapter`` may also be given explicitly, on top of any base. ``check_base=False`` (``salientft
eval --no-check-base``) lets a GIFT-SW adapter onto a base whose weights differ from those it was
trained on.
"""
from __future__ import annotations

from pathlib import Path


def attach_adapter(model, directory: str | Path, check_base: bool = True):
    """Apply a GIFT-SW adapter (either format, either origin) in place, or wrap the model with
    another PEFT adapter (LoRA, DoRA, ...); returns the model.

    ``check_base=False`` skips the GIFT-SW adapter's check of the base's fingerprint."""
    from ..adapter_format import adapter_kind

    directory = Path(directory)
    kind = adapter_kind(directory)
    if not kind.is_gift_sw:
        from ..methods.peft_baselines import attach_peft_adapter, require_peft
        from ..quant.layer import QuantizedSalientLinear

        config = None
        if any(isinstance(m, QuantizedSalientLinear) for m in model.modules()):
            from ..quant.ste import register_quantized_lora

            peft = require_peft(f"{directory} is a PEFT adapter and")
            config = register_quantized_lora(peft.LoraConfig.from_pretrained(str(directory)))
        return attach_peft_adapter(model, directory, config)
    from ..gift.adapter import load_adapter  # lazy: only runs need it

    return load_adapter(model, directory, check_base=check_base).eval()


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "run_config.json").is_file() and any((p / d).is_dir() for d in ("model", "merged", "adapter"))


def _load_run(path: Path, dtype, device, check_base: bool = True):
    """A finished run: its plain ``merged/`` model if written, else what its method re-attaches."""
    from .. import methods
    from .._io import read_json_object
    from ..models import load_model

    run_cfg = read_json_object(path / "run_config.json", "the run's TrainConfig")
    if (path / "merged" / "config.json").is_file():
        m, tok = load_model(str(path / "merged"), dtype=dtype, device=device)
        return m, tok, f"{path} (full model merged/)"
    if not run_cfg.get("method"):
        return _load_unnamed_run(path, run_cfg, dtype, device, check_base)
    method = methods.get(run_cfg["method"], quantized=run_cfg.get("quantized") is not None)
    if not (path / method.output).is_dir():
        raise FileNotFoundError(
            f"{path} has run_config.json but no {method.output}/: the run did not finish saving"
        )
    m, tok = method.load_run(path, run_cfg, dtype=dtype, device=device, check_base=check_base)
    base = run_cfg.get("quantized") or run_cfg.get("model")
    what = f"full model {method.output}/" if method.output == "model" else f"adapter on {base}"
    return m, tok, f"{path} ({what})"


def _load_unnamed_run(path: Path, run_cfg: dict, dtype, device, check_base: bool = True):
    """A run folder whose run_config.json names no method (assembled by hand): ``model/`` is a
    whole model, ``adapter/`` a salientft or PEFT adapter on the base it names."""
    from ..models import load_model

    if (path / "model" / "config.json").is_file():
        m, tok = load_model(str(path / "model"), dtype=dtype, device=device)
        return m, tok, f"{path} (full model model/)"
    if not (path / "adapter").is_dir():
        raise FileNotFoundError(f"{path} has run_config.json but no model/, merged/ or adapter/: "
                                "the run did not finish saving")
    base = run_cfg.get("quantized") or run_cfg.get("model")
    if not base:
        raise ValueError(f"{path / 'run_config.json'} has no \"model\" key naming the base model")
    m, tok = load_model(base, dtype=dtype, device=device)
    return attach_adapter(m, path / "adapter", check_base), tok, f"{path} (adapter on {base})"


def load_for_eval(model: str, adapter: str | Path | None = None, dtype="bf16", device=None,
                  check_base: bool = True):
    """Return ``(model, tokenizer, description)`` for a preset, path, hub id or run directory."""
    from ..models import load_model

    path = Path(str(model))
    if path.is_dir() and (path / "run_config.json").is_file():
        m, tok, desc = _load_run(path, dtype, device, check_base)
    else:
        m, tok = load_model(str(model), dtype=dtype, device=device)
        desc = str(model)
    if adapter is not None:
        m = attach_adapter(m, adapter, check_base)
        desc += f" + adapter {adapter}"
    m.eval()
    return m, tok, desc
