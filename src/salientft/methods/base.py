"""What one training method is, and the registry that names them.

A method answers every question the training loop, the checkpointing and the evaluation loader
would otherwise answer with an if-chain on its name: its default learning rate, the dtype it
keeps master weights in, how it makes a loaded model trainable, its Trainer callbacks (GMT),
what a checkpoint holds and how it is restored, what the finished run writes, and how that
output is re-attached to a base model. A new method is one module in this package that
subclasses ``Method`` and calls ``register``; the shared contract test
(``tests/test_methods_contract.py``) then checks it with every other method.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

_REGISTRY: dict[tuple[str, bool], "Method"] = {}

# GMT's settings that matter only when a gradient mask runs (``Method.mask_config``).
MASK_FIELDS = ("mask_granularity", "mask_mode")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class Method:
    """One training method; subclasses set the class attributes and override what differs.

    ``quantized`` methods recover a model written by ``salientft quantize`` (``--quantized``);
    the others train a plain transformers model. ``dense`` methods train every weight and keep
    fp32 master weights whatever ``--dtype`` says (a bf16 AdamW update of 3e-5 on a weight of
    0.05 is below half its spacing and would be rounded away). ``accepts_mask`` says whether
    GMT's gradient mask may run on top (``--mask-ratio``); ``default_mask_ratio`` turns it on
    by default. ``output`` is the folder the finished run writes: ``adapter`` or ``model``.
    ``uses`` names the method-specific TrainConfig fields the method reads (``declared`` adds
    GMT's when it accepts the mask, and ``merge`` when it is ``mergeable``); a field no method
    declares is generic and always applies, and a method refuses a declared-by-others field
    given a value other than its default (``validate``).
    """

    name: ClassVar[str]
    quantized: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    default_lr: ClassVar[float] = 3e-5  # docs/methods.md#gift-paper-results: the baselines' learning rate on LLaMA2
    dense: ClassVar[bool] = False
    accepts_mask: ClassVar[bool] = True
    default_mask_ratio: ClassVar[float | None] = None
    output: ClassVar[str] = "adapter"
    requires: ClassVar[tuple[str, ...]] = ()  # optional modules it imports (checked before any work)
    uses: ClassVar[frozenset[str]] = frozenset()

    def __repr__(self) -> str:
        return f"<method {self.name!r}{' (quantized)' if self.quantized else ''}>"

    # ------------------------------------------------------------------ configuration
    def declared(self) -> frozenset[str]:
        """Every method-specific TrainConfig field this method may read."""
        extra = {"mask_ratio", *MASK_FIELDS} if self.accepts_mask else set()
        if self.mergeable:
            extra.add("merge")
        return frozenset(self.uses | extra)

    def fields_used(self, config) -> frozenset[str]:
        """The declared fields that matter for ``config`` (GMT's granularity and mode only with a mask)."""
        used = self.declared()
        return used if self.mask_config(config) is not None else used - set(MASK_FIELDS)

    def only_used(self, values: dict) -> dict:
        """``values`` (TrainConfig fields) without the method-specific ones this method never reads:
        for callers that share one set of settings across methods (benchmarks, tests)."""
        specific = method_specific_fields()
        return {k: v for k, v in values.items() if k not in specific or k in self.declared()}

    def validate(self, config) -> None:
        """Refuse settings this method cannot honour (raise ValueError naming the fix).

        The base refuses method-specific fields given (not at their default) that this method
        does not use, in one message, and a missing ``--quantized`` folder."""
        used = self.fields_used(config)
        specific = method_specific_fields()
        former = getattr(type(config), "FORMER_DEFAULTS", {})
        given = [f.name for f in dataclasses.fields(config)
                 if f.name in specific and f.name not in used and getattr(config, f.name) != f.default
                 and not (f.name in former and getattr(config, f.name) == former[f.name])]
        if given:
            hints = []
            for name in given:
                users = [m.name for m in registered() if m.quantized == self.quantized and name in m.declared()]
                hint = f"{_flag(name)} applies to {', '.join(users) or 'no method of this kind'}"
                hints.append(hint + (" when a gradient mask runs (--mask-ratio)" if name in MASK_FIELDS else ""))
            flags = ", ".join(_flag(n) for n in given)
            kind = " (--quantized)" if self.quantized else ""
            raise ValueError(f"TrainConfig: method {self.name!r}{kind} does not use {flags}; "
                             f"remove {'it' if len(given) == 1 else 'them'} ({'; '.join(hints)})")
        if self.quantized and not Path(config.quantized).is_dir():
            raise FileNotFoundError(f"--quantized {config.quantized}: no such folder; "
                                    "give a folder written by salientft quantize")

    def master_dtype(self, config) -> torch.dtype:
        """The dtype the base model is loaded in (frozen weights may stay 16-bit; dense ones not)."""
        from ..models import resolve_dtype

        return torch.float32 if self.dense else resolve_dtype(config.dtype)

    def base_source(self, config) -> str:
        """What to load as the base: the quantized folder when recovering, else the model."""
        return config.quantized or config.model

    # ------------------------------------------------------------------ training
    def prepare(self, model, config, data=None, **precomputed):
        """Make a loaded base model trainable the method's way; returns the model to train.

        ``data`` is the tokenized training set (for calibration); ``precomputed`` carries costly
        intermediates a caller already has (GIFT-SW: ``scores``, ``noise_std``); a method
        ignores the ones it does not use.
        """
        raise NotImplementedError

    def mask_config(self, config):
        """GMT's config for this run, or None when no gradient mask runs on top."""
        ratio = config.mask_ratio if config.mask_ratio is not None else self.default_mask_ratio
        if ratio is None or not self.accepts_mask:
            return None
        from ..gmt import GMTConfig

        return GMTConfig(ratio=ratio, granularity=config.mask_granularity, mode=config.mask_mode)

    def callbacks(self, config) -> list:
        """Trainer callbacks of the method (GMT's gradient mask when it applies)."""
        mcfg = self.mask_config(config)
        if mcfg is None:
            return []
        from ..gmt import GradientMaskCallback

        return [GradientMaskCallback(mcfg)]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, model, directory: Path) -> bool:
        """Write the model's part of a Trainer checkpoint into ``directory``; False: the Trainer's."""
        return False

    def load_checkpoint(self, model, directory: Path) -> bool:
        """Restore what ``save_checkpoint`` wrote; False: let the Trainer restore its own."""
        return False

    def gather_trained(self, model):
        """Under FSDP, at the end of training, on every rank (a collective): what rank 0 needs to
        rebuild the trained model on a freshly loaded base with ``attach_trained``, gathering only
        what trained; None (the default): the full state dict is gathered and the preparation repeated."""
        return None

    def attach_trained(self, base, trained):
        """The trained model on ``base`` from what ``gather_trained`` returned (rank 0)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ outputs
    mergeable: ClassVar[bool] = False  # merge() gives a plain transformers model

    def save_final(self, model, tokenizer, config, out: Path) -> None:
        """Write the finished run's ``output`` folder (and ``merged/`` when asked) into ``out``."""
        self.save_output(model, tokenizer, config, out)
        if config.merge and self.mergeable:
            save_plain_model(self.merge(model), tokenizer, out / "merged")

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        """Write ``out/<output>``: what ``attach`` reads back."""
        raise NotImplementedError

    def merge(self, model):
        """The trained model as a plain transformers model (only when ``mergeable``)."""
        raise NotImplementedError(f"method {self.name!r} cannot be merged into a plain model")

    def attach(self, base, out: Path, check_base: bool = True):
        """The finished run in ``out`` re-attached to a freshly loaded ``base``; returns the model.

        ``check_base=False`` skips an adapter's check that ``base`` is the model it was trained on."""
        raise NotImplementedError

    def load_run(self, out: Path, run_config: dict, dtype="bf16", device=None, check_base: bool = True):
        """(model, tokenizer) of a finished run, for evaluation: load the base, attach the output."""
        from ..models import load_model

        base = run_config.get("quantized") or run_config.get("model")
        if not base:
            raise ValueError(f"{Path(out) / 'run_config.json'} has no \"model\" key naming the base model")
        model, tok = load_model(base, dtype=dtype, device=device)
        return self.attach(model, Path(out), check_base=check_base), tok


class WholeModelMethod(Method):
    """A method whose finished run is a whole model in ``model/`` (plain or quantized)."""

    output = "model"

    def attach(self, base, out: Path, check_base: bool = True):
        """The output replaces the base, which only fixes the dtype and the device."""
        from ..models import load_model

        p = next(base.parameters())
        model, _ = load_model(str(Path(out) / "model"), dtype=p.dtype, device=p.device)
        return model

    def load_run(self, out: Path, run_config: dict, dtype="bf16", device=None, check_base: bool = True):
        from ..models import load_model

        return load_model(str(Path(out) / "model"), dtype=dtype, device=device)


def save_plain_model(model, tokenizer, directory: Path) -> None:
    """Write a transformers model and its tokenizer into ``directory``, atomically, with the
    manifest of a salientft output folder (``salientft.outputs``)."""
    from ..outputs import output_dir

    with output_dir(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``salientft.methods.get(cls.name, cls.quantized)``."""
    key = (cls.name, cls.quantized)
    if key in _REGISTRY:
        raise ValueError(f"method {cls.name!r} (quantized={cls.quantized}) is registered twice")
    _REGISTRY[key] = cls()
    return cls


def method_specific_fields() -> frozenset[str]:
    """The TrainConfig fields some registered method declares; every other field is generic."""
    return frozenset().union(*(m.declared() for m in registered()))


def registered() -> list[Method]:
    """Every registered method, plain ones first, in registration order."""
    return sorted(_REGISTRY.values(), key=lambda m: m.quantized)


def names(quantized: bool | None = False) -> list[str]:
    """Names of the methods for a plain model (default), a quantized one (True), or all (None)."""
    out = []
    for m in registered():
        if (quantized is None or m.quantized == quantized) and m.name not in out:
            out.append(m.name)
    return out


def get(name: str, quantized: bool = False) -> Method:
    """The method called ``name`` (for recovering a quantized model when ``quantized``)."""
    method = _REGISTRY.get((name, bool(quantized)))
    if method is not None:
        return method
    if quantized and (name, False) in _REGISTRY:
        raise ValueError(f"--quantized recovers with one of {names(quantized=True)}, not {name!r}")
    if not quantized and (name, True) in _REGISTRY:
        raise ValueError(f"method {name!r} trains a quantized model: give --quantized DIR (from salientft quantize)")
    raise ValueError(f"unknown method {name!r}; choose from {names(quantized=bool(quantized))}")
