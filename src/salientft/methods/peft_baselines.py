"""The PEFT baselines: LoRA and DoRA on the same target layers as GIFT-SW (docs/methods.md#gift-paper-results).

The Trainer checkpoints a ``PeftModel`` on its own (adapter weights only); the finished run
writes the PEFT adapter folder ``adapter/``, which stock ``PeftModel.from_pretrained`` reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_dir
from ..config_base import check_range, flag
from ..targets import find_target_modules
from .base import Method, MethodConfig, merge_field, register, targets_field

PEFT_HINT = "pip install 'salientft[peft]'"


def require_peft(what: str):
    """Import peft (with GIFT-SW registered) or explain how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"{what} needs PEFT: {PEFT_HINT}") from None
    from ..peft import register

    register()  # GIFT_SW in PEFT's mappings, whatever imported PEFT before (idempotent)
    return peft


@dataclass
class LoRASettings(MethodConfig):
    """LoRA's rank, scale and dropout (every LoRA method's; docs/methods.md#gift-paper-results)."""

    lora_r: int = flag(8, "rank r")
    lora_alpha: float | None = flag(None, "alpha (default 2r)")
    lora_dropout: float = flag(0.0, "dropout")

    def check(self) -> None:
        check_range(self, "lora_r", min=1, what="must be a positive integer")
        check_range(self, "lora_alpha", min=0, min_open=True, what="must be positive")
        check_range(self, "lora_dropout", min=0, max=1, max_open=True)


@dataclass
class LoRAMethodConfig(LoRASettings):
    """``lora``'s settings: LoRA's, the target layers (GIFT-SW's by default) and ``merge``."""

    target_modules: list[str] | str | None = targets_field()
    merge: bool = merge_field()

    def check(self) -> None:
        super().check()
        from ..gift.config import check_targets

        check_targets(self)


@dataclass
class DoRAMethodConfig(LoRAMethodConfig):
    """``dora``'s settings: LoRA's."""


def lora_alpha(settings: LoRASettings) -> float:
    return settings.lora_alpha or 2 * settings.lora_r


def save_peft_adapter(model, out: Path) -> None:
    with atomic_dir(out / "adapter") as tmp:
        model.save_pretrained(tmp)


def attach_peft_adapter(base, directory: Path, config=None):
    """``base`` wrapped with the PEFT adapter in ``directory``, for inference."""
    peft = require_peft(f"{directory} is a PEFT adapter and")
    kwargs = {"config": config} if config is not None else {}
    return peft.PeftModel.from_pretrained(base, str(directory), is_trainable=False, **kwargs).eval()


@register
class LoRA(Method):
    name = "lora"
    summary = "LoRA baseline through PEFT"
    config_class = LoRAMethodConfig
    requires = ("peft",)
    accepts_mask = False
    use_dora = False

    def prepare(self, model, config, data=None, **_):
        peft = require_peft(f"the {self.name} baseline")
        s = config.method_config
        names = sorted({n.rsplit(".", 1)[-1] for n in find_target_modules(model, s.target_modules)})
        lcfg = peft.LoraConfig(
            r=s.lora_r, lora_alpha=lora_alpha(s), lora_dropout=s.lora_dropout,
            target_modules=names, use_dora=self.use_dora, task_type="CAUSAL_LM",
        )
        return peft.get_peft_model(model, lcfg)

    mergeable = True

    def attach(self, base, out: Path, check_base: bool = True):
        """Stock ``PeftModel.from_pretrained`` on the base, for inference (PEFT keeps no fingerprint)."""
        return attach_peft_adapter(base, Path(out) / "adapter")

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        """PEFT's own adapter folder, which any PEFT tool reads."""
        save_peft_adapter(model, out)

    def merge(self, model):
        return model.merge_and_unload()


@register
class DoRA(LoRA):
    name = "dora"
    summary = "DoRA baseline through PEFT"
    config_class = DoRAMethodConfig
    use_dora = True
