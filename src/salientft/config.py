"""TrainConfig: everything one ``salientft train`` run needs; every setting is a flag.

The run's generic settings are TrainConfig's fields; the chosen method's own settings are its
config (``method_config``: a ``salientft.methods.MethodConfig`` subclass, declared with the
method), and GMT's gradient mask is an add-on the run configures (``mask``: a ``GMTConfig``) and
a method may refuse. Both forms build the same config, and the flags of ``salientft train`` are
generated from the registered methods' configs (:meth:`TrainConfig.flag_fields`)::

    TrainConfig(method="gift-sw", n_salient=64, mask_ratio=0.3)          # flat (flags, YAML of 0.x)
    TrainConfig(method=GiftSWMethodConfig(n_salient=64), mask=GMTConfig(ratio=0.3))

GiftConfig, GMTConfig and the shared helpers are re-exported from here for backward
compatibility (their homes: ``gift.config``, ``gmt``, ``config_base``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from . import methods as _methods
from .config_base import (  # noqa: F401  (re-exported)
    GMT_DEFAULT_RATIO,
    NOISE_MODES,
    PAPER_SALIENT_FRACTION,
    ConfigMixin,
    check_choice,
    check_range,
    coerce_field,
    coerce_fields,
    field_types,
    flag,
    salient_count,
)
from .devices import check_device_spec
from .gift.config import GiftConfig  # noqa: F401  (re-exported)
from .gmt import GMT_DEFAULT_EXCLUDE, GMTConfig  # noqa: F401  (re-exported)
from .methods.base import MethodConfig, for_config, methods_reading


# The flags of the run's gradient mask (GMT, docs/gmt.md): flag name -> (GMTConfig field, type, help).
# GMTConfig holds the defaults; a mask runs when --mask-ratio is given, or by the method's default (gmt).
MASK_FLAGS = {
    "mask_ratio": ("ratio", "float | None", "GMT: fraction of gradient entries zeroed before each step "
                                            "(turns the mask on; gmt: on by default, 0.5)"),
    "mask_granularity": ("granularity", "str", "GMT: threshold per tensor or global"),
    "mask_mode": ("mode", "str", "GMT: paper (zero the gradient) or strict (masked entries get no update)"),
}
_UNSET = object()


@dataclass(init=False)
class TrainConfig(ConfigMixin):
    """Everything ``salientft train`` needs; every setting is also a command-line flag.

    ``method``: a registered method's name, or its config (``GiftSWMethodConfig(n_salient=64)``,
    ``LoRAMethodConfig(lora_r=16)``, ...: the config names the method); the method's settings are
    ``method_config`` afterwards, and may also be given flat (``n_salient=64``) or nested
    (``method={"name": "gift-sw", "n_salient": 64}``, ``method_config={...}``). ``mask``: GMT's
    gradient mask (a GMTConfig, or flat ``mask_ratio``/``mask_granularity``/``mask_mode``); None:
    off, unless the method turns it on (gmt). ``lr=None`` takes the method's default. ``max_steps``
    wins over ``epochs``. ``quantized`` names a folder written by ``salientft quantize``: the
    method then recovers that quantized model (``salientft.methods.names(quantized=True)``).
    Every setting is validated on creation, before any model loads: a setting of another method
    given a value other than its default is refused with the methods that read it, as is a
    mask the method does not accept. Method settings read as attributes (``config.n_salient``)
    answer from ``method_config`` (another method's: its default).
    """

    model: str = flag("smollm2-135m", "base model: preset (smollm2-135m, tiny-random-llama), folder or hub id")
    data: str = flag("embedded", "training data: 'embedded', a .jsonl file, or a Hugging Face dataset name")
    output: str = flag("runs/default", "output directory of the run")
    method: str = flag("gift-sw", "training method (see `salientft train --help` for the list)")
    lr: float | None = flag(None, "peak learning rate (default: the method's)")
    epochs: float = flag(1.0, "passes over the data (ignored when --max-steps is given)")
    max_steps: int = flag(-1, "optimizer steps (-1: use --epochs)")
    batch_size: int = flag(4, "sequences per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    warmup_ratio: float = flag(0.03, "warm-up steps (a fraction < 1 of the total is a ratio)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0: none)")
    max_length: int = flag(512, "tokens per sequence (longer chats are truncated)")
    packing: bool = flag(False, "pack several chats into each sequence")
    data_limit: int | None = flag(None, "use only the first N training records")
    dtype: str = flag("bf16", "bf16 (frozen weights bf16, trainable fp32, bf16 autocast), fp16 (the same in fp16, with a gradient scaler) or fp32")
    device: str = flag("auto", "where every phase runs (loading, calibration, training, evaluation): auto (CUDA if available, else CPU), cpu, cuda or cuda:N; under torchrun each process uses its LOCAL_RANK GPU")
    gradient_checkpointing: bool = flag(False, "recompute activations in backward to save memory")
    fsdp: str = flag("", "under torchrun/accelerate launch: shard weights, gradients and optimizer state with FSDP2 per decoder layer: full_shard (re-gather in backward) or shard_grad_op (keep gathered until backward); '' for none (DDP). See docs/distributed.md")
    seed: int = flag(0, "random seed (data order, salient columns of metric 'random', noise)")
    save_steps: int = flag(0, "write a resumable checkpoint every N steps (0: none)")
    logging_steps: int = flag(1, "log the loss every N steps")
    # Evaluation before/after (the eval tasks, or "loss" for held-out loss only; "" for none)
    eval_tasks: str = flag("", "evaluate before/after on these tasks ('paper', 'all', names; '' for none)")
    eval_limit: int | None = flag(None, "first N items of each eval task")
    eval_subset: str | None = flag(None, "evaluate this fixed seeded item subset (paper500, smoke20) instead of the "
                                         "first eval_limit items; runs on one subset can be compared item by item")
    eval_before: bool = flag(True, "also evaluate the model before training (off: many runs of one base)")
    report_to: str = flag("none", "experiment trackers for the Trainer's logs: none, tensorboard, wandb, mlflow, ... (comma-separated)")
    trust_remote_code: bool = flag(False, "allow the model's own code from the hub (off by default)")
    quantized: str | None = flag(None, "recover this quantized model (a folder from salientft quantize)")
    # Not flags: built from the flags above and the method's (flag_fields)
    method_config: MethodConfig | None = field(default=None, metadata={"flag": False})
    mask: GMTConfig | None = field(default=None, metadata={"flag": False})

    # Defaults changed since runs were stored: a stored (or YAML) value equal to the former default
    # counts as the setting left at its default (run_config.json files of earlier versions still load
    # and resume). fp32_salient was False ("always on with bf16"); it is GiftConfig's True now.
    FORMER_DEFAULTS: ClassVar[dict] = {"fp32_salient": False}

    def __init__(self, **values):
        values = flat_values(values)
        for f in dataclasses.fields(self):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            object.__setattr__(self, f.name, values.pop(f.name, default))
        method = self._resolve_method(values)
        self._resolve_mask(method, values)
        if values:  # neither a field, nor a setting of this method or of another one
            names = sorted({f.name for f in dataclasses.fields(self)} | setting_names() | set(MASK_FLAGS))
            raise ValueError(f"TrainConfig: unknown field(s) {', '.join(sorted(values))}; valid fields: "
                             f"{', '.join(names)}")
        self.__post_init__()

    def _resolve_method(self, values: dict) -> _methods.Method:
        """``method`` as the name, ``method_config`` as the method's config (the flat settings of
        ``values`` it declares folded in, and popped); the other methods' settings are refused unless
        at their default. Returns the method (``methods.get``: once per config)."""
        given = self.method_config
        if isinstance(self.method, MethodConfig):
            if given is not None:
                raise ValueError("TrainConfig: give the method's settings once: method=<its config> or method_config")
            given = self.method
            method = for_config(given)
            self.method = method.name
            if method.quantized != (self.quantized is not None):
                raise ValueError(f"TrainConfig: {type(given).__name__} configures {method.name!r} "
                                 + ("on a quantized model: give quantized=<folder from salientft quantize>"
                                    if method.quantized else "on a plain model, not with quantized="))
        else:
            self.method = coerce_field("TrainConfig", "method", str, self.method)
            method = _methods.get(self.method, quantized=self.quantized is not None)
        own = {k: values.pop(k) for k in list(values) if k in method.declared()}
        if isinstance(given, dict):
            self.method_config = method.config_class.from_dict({**given, **own})
        elif isinstance(given, method.config_class) and type(given) is method.config_class:
            self.method_config = dataclasses.replace(given, **own) if own else given
        elif given is None:
            self.method_config = method.config_class(**own)
        else:
            raise ValueError(f"TrainConfig.method_config is a {type(given).__name__}; method {method.name!r} "
                             f"takes a {method.config_class.__name__}")
        _refuse_other_settings(method, values)
        self._method = method
        return method

    def _resolve_mask(self, method: _methods.Method, values: dict) -> None:
        """``mask`` as a GMTConfig (the flat --mask-* values folded in, and popped) or None."""
        types = field_types(GMTConfig)
        flat = {k: values.pop(k) for k in MASK_FLAGS if k in values}
        flat = {k: None if v is None else coerce_field("TrainConfig", k, types[MASK_FLAGS[k][0]], v)
                for k, v in flat.items()}
        _check_mask_flags(flat)
        mask = self.mask
        if isinstance(mask, dict):
            mask = GMTConfig.from_dict(mask)
        elif mask is not None and not isinstance(mask, GMTConfig):
            raise ValueError(f"TrainConfig.mask must be a GMTConfig, a mapping of its fields, or null; got {mask!r}")
        on = mask is not None or flat.get("mask_ratio") is not None or method.mask_by_default
        changes = {MASK_FLAGS[k][0]: v for k, v in flat.items() if v is not None}
        if not on:
            idle = [k for k, v in changes.items() if v != _mask_default(k)]
            if idle:
                raise ValueError(f"TrainConfig: {', '.join(_flag('mask_' + k) for k in idle)} "
                                 f"{'applies' if len(idle) == 1 else 'apply'} only when a gradient mask runs; add "
                                 f"--mask-ratio, or remove {'it' if len(idle) == 1 else 'them'}")
            self.mask = None
            return
        if not method.accepts_mask:
            users = [m for m in _methods.names(quantized=method.quantized) if _methods.get(m, method.quantized).accepts_mask]
            raise ValueError(f"TrainConfig: method {method.name!r} does not use --mask-ratio (GMT's gradient mask); "
                             f"remove it (--mask-ratio applies to {', '.join(users) or 'no method of this kind'})")
        self.mask = dataclasses.replace(mask or GMTConfig(), **changes)

    def __post_init__(self):
        n = type(self).__name__
        coerce_fields(self, only=[f.name for f in dataclasses.fields(self) if f.name not in ("method_config", "mask")])
        check_choice(n, "dtype", self.dtype, ("bf16", "fp32", "fp16"))
        # the spelling only: whether the device is there is checked where the run starts (train), so a
        # config can be written on a machine without it
        self.device = check_device_spec(self.device, flag=f"{n}.device")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
            check_range(self, name, min=1, what="must be a positive integer")
        check_range(self, "lr", min=0, min_open=True, what="must be positive")
        check_range(self, "warmup_ratio", min=0, max=1, max_open=True, what="must be in [0, 1)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"{n}.max_steps must be positive (or -1 to use epochs), got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ValueError(f"{n}.epochs must be positive, got {self.epochs}")
        check_range(self, "save_steps", min=0, what="must be >= 0 (0: no intermediate checkpoints)")
        check_choice(n, "fsdp", self.fsdp, FSDP_MODES)
        self._check_evaluation()
        self._check_bounds()
        self._method.validate(self)

    def _check_evaluation(self) -> None:
        n = type(self).__name__
        if self.eval_tasks:
            from .evaluation.tasks import parse_tasks

            parse_tasks(self.eval_tasks)  # unknown names fail now, not after training
        if self.eval_subset is not None:
            from .evaluation.tasks import get_subset

            get_subset(self.eval_subset)
            if self.eval_limit is not None:
                raise ValueError(f"{n}.eval_limit and {n}.eval_subset are exclusive: a subset fixes the items itself")
        if not isinstance(self.report_to, str) or not self.report_to.strip():
            raise ValueError(f"{n}.report_to must name trackers (e.g. 'tensorboard') or be 'none', got {self.report_to!r}")

    def _check_bounds(self) -> None:
        """The numeric fields the checks above leave open (types are already checked: finite floats)."""
        for name in ("weight_decay", "max_grad_norm"):
            check_range(self, name, min=0, what="must be >= 0")
        check_range(self, "epochs", min=0, min_open=True, what="must be positive")
        check_range(self, "seed", min=0, max=2**32 - 1)
        check_range(self, "eval_limit", min=1, what="must be a positive integer")
        check_range(self, "data_limit", min=1, what="must be positive")
        from .deps import tracker_names

        tracker_names(self.report_to)  # an unknown tracker: refused now, with the nearest valid name

    # ------------------------------------------------------------------ reading
    def __getattr__(self, name):
        # Only for names that are not attributes: a method's setting read flat (config.n_salient),
        # the mask's (config.mask_ratio); another method's setting answers its default.
        if name.startswith("_") or name in ("method_config", "mask"):
            raise AttributeError(name)
        settings = self.__dict__.get("method_config")
        if settings is not None and name in {f.name for f in dataclasses.fields(settings)}:
            return getattr(settings, name)
        if name in MASK_FLAGS:
            mask = self.__dict__.get("mask")
            if mask is not None:
                return getattr(mask, MASK_FLAGS[name][0])
            return None if name == "mask_ratio" else _mask_default(MASK_FLAGS[name][0])
        default = setting_default(name)
        if default is not _UNSET:
            return default
        raise AttributeError(f"'TrainConfig' object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name not in self.__dataclass_fields__ and not name.startswith("_") and (
                name in setting_names() or name in MASK_FLAGS):
            raise AttributeError(f"TrainConfig.{name} is the method's setting (or the mask's): build a new "
                                 f"TrainConfig with {name}=..., or set it on config.method_config / config.mask")
        object.__setattr__(self, name, value)

    @property
    def training_method(self) -> _methods.Method:
        """The registered method this run trains with (``salientft.methods``)."""
        return self._method

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else self._method.default_lr

    def gift_config(self) -> GiftConfig:
        """The GiftConfig of a GIFT-SW run (method gift-sw or salient)."""
        return self._method.gift_config(self)

    # ------------------------------------------------------------------ forms
    @classmethod
    def from_dict(cls, d: dict):
        """A TrainConfig from its ``to_dict`` form, the flat form (flags, 0.x YAML and run_config.json
        files) or the nested YAML form ``method: {name: ..., <setting>: ...}``."""
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig: expected a mapping of its fields, got {type(d).__name__}")
        return cls(**d)

    def flat(self) -> dict:
        """Every setting under its flag's name (the generic fields, the method's, the mask's)."""
        return settings_of(self.to_dict())

    @classmethod
    def flag_fields(cls) -> list[dataclasses.Field]:
        """The flags of ``salientft train``: the generic fields, the mask's, and every registered
        method's settings once (the help prefixed with the methods that read it)."""
        out = [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]
        for name, (_, ftype, text) in MASK_FLAGS.items():
            out.append(_field(name, ftype, _mask_default(MASK_FLAGS[name][0]) if name != "mask_ratio" else None,
                              text))
        for name, f in _setting_fields().items():
            users = methods_reading(name, quantized=None)
            out.append(_field(name, f.type, f.default, f"{', '.join(users)}: {f.metadata.get('help', '')}"))
        return out


# TrainConfig.fsdp: "" (no sharding) or FSDP2's two sharding strategies (docs/distributed.md)
FSDP_MODES = ("", "full_shard", "shard_grad_op")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field(name: str, ftype, default, text: str) -> dataclasses.Field:
    f = flag(default, text)
    f.name, f.type = name, ftype
    return f


def _setting_fields() -> dict[str, dataclasses.Field]:
    """Every registered method's setting, by name: its first declaration (plain methods first)."""
    out: dict[str, dataclasses.Field] = {}
    for m in _methods.registered():
        for f in dataclasses.fields(m.config_class):
            out.setdefault(f.name, f)
    return out


def setting_names() -> frozenset[str]:
    """Every registered method's setting names."""
    return frozenset(_setting_fields())


def setting_default(name: str):
    """The default of the setting ``name`` as its method declares it (``_UNSET`` for none)."""
    f = _setting_fields().get(name)
    return _UNSET if f is None else f.default


def _check_mask_flags(flat: dict) -> None:
    """The --mask-* values as the user gave them, refused under their flag's name (GMTConfig checks
    its fields again, for a mask built in Python)."""
    choices = {"mask_granularity": GMTConfig.GRANULARITIES, "mask_mode": GMTConfig.MODES}
    for k, v in flat.items():
        if v is not None and k in choices:
            check_choice("TrainConfig", k, v, choices[k])
    ratio = flat.get("mask_ratio")
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"TrainConfig.mask_ratio must be in [0, 1), got {ratio!r}")


def _mask_default(name: str):
    """GMTConfig's default of its field ``name`` (a mask built with nothing given)."""
    return getattr(GMTConfig(), name)


def _refuse_other_settings(method: _methods.Method, values: dict) -> None:
    """Pop the other methods' settings from ``values``; refuse those not at their default (nor at a
    former default: run_config.json files of earlier versions hold every method's)."""
    given = []
    for name in [k for k in values if k in setting_names()]:
        value = values.pop(name)
        former = TrainConfig.FORMER_DEFAULTS.get(name, _UNSET)
        if value != setting_default(name) and not (former is not _UNSET and value == former):
            given.append(name)
    if given:
        hints = [f"{_flag(n)} applies to {', '.join(methods_reading(n, method.quantized)) or 'no method of this kind'}"
                 for n in given]
        kind = " (--quantized)" if method.quantized else ""
        raise ValueError(f"TrainConfig: method {method.name!r}{kind} does not use {', '.join(map(_flag, given))}; "
                         f"remove {'it' if len(given) == 1 else 'them'} ({'; '.join(hints)})")


def flat_values(d: dict) -> dict:
    """``d`` with the nested method forms unfolded: ``method: {name: m, ...}`` and ``method_config:
    {...}`` give their settings flat (a flat key of ``d`` wins: the flags over a file's section)."""
    d = dict(d)
    nested = {}
    if isinstance(d.get("method"), dict):
        section = dict(d["method"])
        if "name" not in section:
            raise ValueError("TrainConfig.method: the nested form needs the method's name (method: {name: gift-sw, ...})")
        d["method"] = section.pop("name")
        nested.update(section)
    if isinstance(d.get("method_config"), dict):
        nested.update(d.pop("method_config"))
    return {**nested, **d}


def settings_of(d: dict) -> dict:
    """A stored config (``to_dict``'s nested form, or the flat form of earlier versions) as the
    flat settings a run trains with, for comparing two runs (``runfolder``, ``--resume``): only
    the method's own settings and the mask's when it runs; a setting absent (added since) at its
    default; a former default as the current one; unreadable parts left as they are."""
    flat = flat_values(d)
    try:
        method = _methods.get(flat.get("method"), quantized=flat.get("quantized") is not None)
    except (ValueError, TypeError):
        return flat
    generic = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)}
    own = {f.name: f.default for f in dataclasses.fields(method.config_class)}
    out = {**generic, **own, **{k: v for k, v in flat.items() if k in generic or k in own}}
    for key, former in TrainConfig.FORMER_DEFAULTS.items():
        if key in out and out[key] == former:
            out[key] = own.get(key, generic.get(key))
    out.update(_mask_settings(method, flat))
    extra = {k: v for k, v in flat.items() if k not in out and k not in MASK_FLAGS and k != "mask"
             and k not in setting_names()}
    return {**out, **extra}


def _mask_settings(method: _methods.Method, flat: dict) -> dict:
    """The mask's settings of a stored config, flat (``mask_<field>``); only ``mask_ratio: None`` without one."""
    mask = flat.get("mask")
    on = isinstance(mask, dict) or flat.get("mask_ratio") is not None or method.mask_by_default
    if not on:
        return {"mask_ratio": None}
    values = GMTConfig().to_dict()
    values.update(mask if isinstance(mask, dict) else {})
    values.update({MASK_FLAGS[k][0]: v for k, v in flat.items() if k in MASK_FLAGS and v is not None})
    return {f"mask_{k}": v for k, v in values.items()}


def resolve_train_config(config_file: str | None, flags: dict) -> TrainConfig:
    """The run's config: the YAML/JSON file's settings (flat or nested), overridden by the flags given."""
    values: dict = {}
    if config_file:
        values = flat_values(_read_config_file(config_file))
    from_file = set(values) - set(flags)
    values.update(flags)
    try:
        return TrainConfig.from_dict(values)
    except ValueError as e:
        known = {f.name for f in dataclasses.fields(TrainConfig)} | setting_names() | set(MASK_FLAGS)
        if config_file and (not set(values) <= known or getattr(e, "field", None) in from_file):
            raise ValueError(f"--config {config_file}: {e}") from None  # the file's unknown or mistyped fields
        raise


def _read_config_file(config_file: str) -> dict:
    import yaml

    from .config_base import YAMLTooLarge, load_yaml

    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"--config {config_file}: no such file")
    try:
        values = load_yaml(path.read_text(encoding="utf-8")) or {}
    except YAMLTooLarge as e:
        raise ValueError(f"--config {config_file} is refused: {e}; write the values out") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {config_file} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {config_file} must hold a mapping of TrainConfig fields")
    return values


def __getattr__(name):
    # Deprecated module constants, now answered by the registry.
    if name == "METHODS":
        return tuple(_methods.names(quantized=None))
    if name == "QUANTIZED_METHODS":
        return tuple(_methods.names(quantized=True))
    if name == "DEFAULT_LR":
        lrs: dict[str, float] = {}
        for m in _methods.registered():  # plain methods first: they win a shared name
            lrs.setdefault(m.name, m.default_lr)
        return lrs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
