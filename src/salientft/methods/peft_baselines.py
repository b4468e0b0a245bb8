"""The PEFT baselines: LoRA and DoRA on the same target layers as GIFT-SW (docs/methods.md#gift-paper-results).

The Trainer checkpoints a ``PeftModel`` on its own (adapter weights only); the finished run
writes the PEFT adapter folder ``adapter/``, which stock ``PeftModel.from_pretrained`` reads.
"""
from __future__ import annotations

from pathlib import Path

from .._io import atomic_dir
from ..targets import find_target_modules
from .base import Method, register

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


def lora_alpha(config) -> float:
    return config.lora_alpha or 2 * config.lora_r


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
    requires = ("peft",)
    accepts_mask = False
    use_dora = False
    uses = frozenset({"lora_r", "lora_alpha", "lora_dropout", "target_modules"})

    def prepare(self, model, config, data=None, **_):
        peft = require_peft(f"the {self.name} baseline")
        names = sorted({n.rsplit(".", 1)[-1] for n in find_target_modules(model, config.target_modules)})
        lcfg = peft.LoraConfig(
            r=config.lora_r, lora_alpha=lora_alpha(config), lora_dropout=config.lora_dropout,
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
    use_dora = True
