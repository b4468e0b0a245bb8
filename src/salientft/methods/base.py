"""What one training method is, its settings, and the registry that names them.

A method answers every question the training loop, the checkpointing and the evaluation loader
would otherwise answer with an if-chain on its name: its settings (``config_class``, a validated
dataclass whose fields become ``salientft train`` flags and YAML keys), its default learning
rate, the dtype it keeps master weights in, how it makes a loaded model trainable, what a
checkpoint holds and how it is restored, what the finished run writes, what it adds to the
run's metrics, and how that output is re-attached to a base model. A new method is one module
in this package that subclasses ``Method`` (with its own ``MethodConfig`` subclass when it has
settings) and calls ``register``; the shared contract test (``tests/test_methods_contract.py``)
then checks it with every other method.

Add-ons the run configures on top of a method (GMT's gradient mask, ``TrainConfig.mask``) are not
the method's business; a method only says whether it accepts them (``accepts_mask``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..config_base import ConfigMixin, coerce_fields, flag

_REGISTRY: dict[tuple[str, bool], "Method"] = {}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


@dataclass
class MethodConfig(ConfigMixin):
    """A method's own settings (PEFT's ``tuners/<method>/config.py``): one dataclass per registered
    method, each field declared once with ``flag(default, help)``. The fields become the flags of
    ``salientft train`` (the help prefixed with the methods that read it) and the keys of the
    nested YAML form ``method: {name: <method>, <field>: ...}``. ``__post_init__`` reads every
    field as its declared type and calls ``check``: a subclass validates its own fields there."""

    method_name: ClassVar[str] = ""  # the registered method's name (set by ``register``), for messages

    def __post_init__(self):
        coerce_fields(self)
        self.check()

    def check(self) -> None:
        """Refuse values this method cannot honour (a ValueError naming the field and the fix)."""


def merge_field():
    """The ``merge`` setting of a mergeable method (its one declaration)."""
    return flag(False, "also write merged/: the trained model as a plain transformers folder")


def targets_field():
    """The ``target_modules`` setting of the methods that train chosen layers (its one declaration)."""
    return flag(None, "layers to train (full/gmt: the layers --noise perturbs): 'q_proj,v_proj' or 're:<regex>' "
                      "(default: all linear layers of the blocks)")


@dataclass
class MergeableConfig(MethodConfig):
    """Settings of a method whose output ``merge()`` turns into a plain transformers model."""

    merge: bool = merge_field()


class Method:
    """One training method; subclasses set the class attributes and override what differs.

    ``config_class`` holds the method's settings (its own class: ``TrainConfig(method=<an instance>)``
    names the method by it). ``quantized`` methods recover a model written by ``salientft
    quantize`` (``--quantized``); the others train a plain transformers model. ``dense`` methods
    train every weight and keep fp32 master weights whatever ``--dtype`` says (a bf16 AdamW update
    of 3e-5 on a weight of 0.05 is below half its spacing and would be rounded away).
    ``accepts_mask``: whether the run's gradient mask (``TrainConfig.mask``, GMT) may run on top;
    ``mask_by_default`` turns it on when the run gives none. ``output`` is the folder the finished
    run writes: ``adapter`` or ``model``.
    """

    name: ClassVar[str]
    quantized: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    default_lr: ClassVar[float] = 3e-5  # docs/methods.md#gift-paper-results: the baselines' learning rate on LLaMA2
    dense: ClassVar[bool] = False
    accepts_mask: ClassVar[bool] = True
    mask_by_default: ClassVar[bool] = False
    output: ClassVar[str] = "adapter"
    requires: ClassVar[tuple[str, ...]] = ()  # optional modules it imports (checked before any work)

    def __repr__(self) -> str:
        return f"<method {self.name!r}{' (quantized)' if self.quantized else ''}>"

    # ------------------------------------------------------------------ configuration
    def declared(self) -> frozenset[str]:
        """The names of this method's settings (the fields of its ``config_class``)."""
        return frozenset(f.name for f in dataclasses.fields(self.config_class))

    def only_used(self, values: dict) -> dict:
        """``values`` (flat TrainConfig settings) without the method-specific ones this method never
        reads: for callers that share one set of settings across methods (benchmarks, tests)."""
        specific = setting_names()
        return {k: v for k, v in values.items() if k not in specific or k in self.declared()}

    def validate(self, config) -> None:
        """Refuse what this method cannot honour in the whole run (``config``, a TrainConfig): its
        own settings were checked by ``config_class`` already; what is left needs the run (the
        dtype, ``--quantized``). Raises a ValueError or FileNotFoundError naming the fix."""
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

    def base_device(self, config, device: torch.device) -> torch.device:
        """Where ``salientft train`` loads the base for a run on ``device``: there (GIFT-SW may keep
        a base that does not fit in host memory, docs/distributed.md#models-larger-than-one-gpu)."""
        return device

    # ------------------------------------------------------------------ training
    def prepare(self, model, config, data=None, **precomputed):
        """Make a loaded base model trainable the method's way; returns the model to train.

        ``config`` is the run's TrainConfig (its settings: ``config.method_config``); ``data`` is
        the tokenized training set (for calibration); ``precomputed`` carries costly intermediates
        a caller already has (GIFT-SW: ``scores``, ``noise_std``); a method ignores the ones it
        does not use.
        """
        raise NotImplementedError

    def metrics(self, log_history: list[dict]) -> dict:
        """What the method adds to the finished run's ``metrics.json``, read from the Trainer's
        log history (the run's add-ons contribute theirs the same way). None by default."""
        return {}

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
        if getattr(config.method_config, "merge", False) and self.mergeable:
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
    for other in _REGISTRY.values():  # TrainConfig(method=<config>) names the method by its class
        if other.config_class is cls.config_class and cls.config_class is not MethodConfig:
            raise ValueError(f"method {cls.name!r} shares {cls.config_class.__name__} with {other.name!r}; "
                             "give it its own subclass")
    _REGISTRY[key] = cls()
    if cls.config_class is not MethodConfig:
        cls.config_class.method_name = cls.name
    return cls


def setting_names() -> frozenset[str]:
    """Every setting some registered method declares (the fields of the config classes)."""
    return frozenset().union(*(m.declared() for m in registered()))


def methods_reading(setting: str, quantized: bool | None = None) -> list[str]:
    """Names of the registered methods (of this kind: ``quantized``; None for all) that declare ``setting``."""
    out = []
    for m in registered():
        if (quantized is None or m.quantized == quantized) and setting in m.declared() and m.name not in out:
            out.append(m.name)
    return out


def for_config(settings: MethodConfig) -> Method:
    """The registered method whose ``config_class`` is exactly ``type(settings)``."""
    for m in registered():
        if type(settings) is m.config_class:
            return m
    raise ValueError(f"{type(settings).__name__} is the config of no registered method; give one of "
                     f"{', '.join(sorted({m.config_class.__name__ for m in registered()}))}")


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
