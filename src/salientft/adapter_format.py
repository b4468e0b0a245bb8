"""Which kind of adapter a folder holds: the one place that answers it (reads JSON only; no torch, no PEFT).

A GIFT-SW adapter has ONE format, whoever wrote it (``salientft train``, ``save_adapter`` or
PEFT's ``save_pretrained`` on a ``GiftSWConfig`` model): a PEFT adapter folder with
``"peft_type": "GIFT_SW"`` in ``adapter_config.json`` and, in ``adapter_model.safetensors``, per
layer ``base_model.model.<name>.giftsw_idx`` (k,), ``.giftsw_weight`` (out, k) and
``.giftsw_noise_std`` (out,). ``base_fingerprint`` ties it to the base weights it was trained on.
Folders written before that (``"format": "salientft-gift"``, version 1) are still read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PEFT_TYPE = "GIFT_SW"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_FORMAT = "salientft-gift"  # version-1 folders: {"format": ..., "version": 1, "gift_config": ..., "modules": ...}
PEFT_PREFIX = "base_model.model."
# salientft's name of each per-layer tensor -> its name in the PEFT-format file (after the layer's name)
TENSOR_NAMES = {"salient_idx": "giftsw_idx", "salient_weight": "giftsw_weight", "noise_std": "giftsw_noise_std"}

GIFT_SW = "gift-sw"        # a GIFT-SW adapter in the PEFT format (either origin)
GIFT_SW_V1 = "gift-sw-v1"  # salientft's first format
PEFT_OTHER = "peft"        # a PEFT adapter of another type (LoRA, DoRA, ...)

IMPORT_HINT = ("GIFT-SW is PEFT tuner type 'GIFT_SW', registered by salientft: `import salientft` before "
               "peft.PeftModel.from_pretrained / AutoPeftModelForCausalLM loads it")


@dataclass(frozen=True)
class AdapterKind:
    """What :func:`adapter_kind` found: ``kind`` (GIFT_SW, GIFT_SW_V1 or PEFT_OTHER), the folder
    and its parsed ``adapter_config.json``."""

    kind: str
    path: Path
    config: dict

    @property
    def is_gift_sw(self) -> bool:
        return self.kind in (GIFT_SW, GIFT_SW_V1)

    @property
    def peft_type(self) -> str | None:
        return self.config.get("peft_type")

    @property
    def base_model(self) -> str | None:
        """The base as salientft loads it (a preset name, a folder or a hub id), if the adapter names one."""
        if self.kind == GIFT_SW_V1:
            return self.config.get("base_model")
        return self.config.get("salientft_base_model") or self.config.get("base_model_name_or_path")


def is_adapter_dir(path) -> bool:
    """Whether ``path`` is a folder with an ``adapter_config.json`` (of any kind)."""
    return (Path(path) / CONFIG_NAME).is_file()


def adapter_kind(directory) -> AdapterKind:
    """Classify an adapter folder; errors name the file and what is wrong with it."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} is not an adapter folder: it has no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is corrupt (not valid JSON: {e}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")
    if config.get("peft_type") == PEFT_TYPE:
        return AdapterKind(GIFT_SW, directory, config)
    if config.get("format") == LEGACY_FORMAT:
        return AdapterKind(GIFT_SW_V1, directory, config)
    if "peft_type" in config:
        return AdapterKind(PEFT_OTHER, directory, config)
    raise ValueError(f"{cfg_path} is neither a GIFT-SW adapter nor a PEFT adapter (no \"peft_type\")")
