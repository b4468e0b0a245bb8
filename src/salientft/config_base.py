"""The bottom of the config layer: JSON/YAML round-trips, choice checks and the shared rules.

Every config dataclass in the package (GiftConfig, GMTConfig, QuantizeConfig, TrainConfig) builds
on ``ConfigMixin``; the rules two of them share (how many salient columns a layer gets, the noise
modes, GMT's default ratio) live here once so that they cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Mapping


def _written(text: str, path: str | Path | None) -> str:
    """Write ``text`` atomically to ``path`` (if given) and return it."""
    if path is not None:
        from ._io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return text


# --------------------------------------------------------------------------- typed fields

# The words a bool field accepts from a config file, a flag or the API (case-insensitive), besides
# true/false themselves and the integers 1/0. Anything else is refused: "false" is False, never truthy.
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
BOOL_WORDS = TRUE_WORDS + FALSE_WORDS


class FieldTypeError(ValueError):
    """A config value that is not of its field's declared type (and cannot be read as one)."""


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is bool:
        return f"true or false ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_NO = object()  # "cannot be read as this type"


def _read_as(tp, value):
    """``value`` as the type ``tp``, or ``_NO``. Numbers come from numbers or numeric strings (YAML
    reads ``2e-4`` as a string), bools from bools, the integers 1/0 or BOOL_WORDS; an int field
    refuses a fractional value, a float field a non-finite one, a str field anything but a string."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        return _read_union(typing.get_args(tp), value)
    reader = _READERS.get(tp)
    if reader is not None:
        return reader(value)
    if origin in (list, tuple) or tp in (list, tuple):
        return _read_list(tp, value)
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _NO
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _NO
    return value  # a type form this reader does not know: left to the config's own checks


def _read_union(args, value):
    for a in args:  # a value already of one of the types is kept as it is ("3" stays a str in str | int)
        if _exact(a, value):
            return _read_as(a, value)
    for a in args:
        got = _read_as(a, value)
        if got is not _NO:
            return got
    return _NO


def _read_none(value):
    return None if value is None else _NO


def _read_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return value.strip().lower() in TRUE_WORDS
    return _NO


def _read_int(value):
    if isinstance(value, bool):
        return _NO
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return _NO
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return _NO


def _read_float(value):
    if isinstance(value, bool):
        return _NO
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return _NO
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return _NO


def _read_str(value):
    return value if isinstance(value, str) else _NO


def _read_list(tp, value):
    if not isinstance(value, (list, tuple, set, frozenset)):
        return _NO
    value = sorted(value) if isinstance(value, (set, frozenset)) and all(isinstance(v, str) for v in value) \
        else list(value)
    args = typing.get_args(tp)
    if not args or args[0] is Any:
        return list(value)
    items = [_read_as(args[0], v) for v in value]
    return _NO if any(v is _NO for v in items) else list(items)


_READERS = {type(None): _read_none, bool: _read_bool, int: _read_int, float: _read_float, str: _read_str}


def _exact(tp, value) -> bool:
    """Is ``value`` already of the (non-union) type ``tp``, with no conversion?"""
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, tp) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def field_types(cls) -> dict[str, Any]:
    """The declared type of every dataclass field of ``cls`` (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def coerce_field(cls_name: str, name: str, tp, value):
    """``value`` read as the declared type ``tp`` of the field ``cls_name.name``; a FieldTypeError
    naming the field, the expected type and the value otherwise."""
    got = _read_as(tp, value)
    if got is _NO:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        err = FieldTypeError(f"{cls_name}.{name} must be {_describe(tp)}, got {shown}")
        err.field = name
        raise err
    return got


def coerce_fields(obj, only=None) -> None:
    """Read every field of the dataclass instance ``obj`` (or those named in ``only``) as its declared
    type, in place (see :func:`coerce_field`). Each config's ``__post_init__`` calls it first, so a
    config built from YAML, JSON, flags or Python gets the same checks."""
    types_ = field_types(type(obj))
    if only is not None:  # some fields only (a subclass of another library's config: its fields are its own)
        types_ = {f: types_[f] for f in only}
    name = type(obj).__name__
    for f, tp in types_.items():
        value = getattr(obj, f)
        got = coerce_field(name, f, tp, value)
        if got is not value:
            object.__setattr__(obj, f, got)


def check_range(obj, name: str, *, min=None, max=None, min_open: bool = False, max_open: bool = False,
                what: str | None = None) -> None:
    """Refuse ``obj.name`` outside [min, max] (``min_open``/``max_open``: the bound itself excluded);
    None (an unset optional field) passes. The message names the field and the allowed range."""
    v = getattr(obj, name)
    if v is None:
        return
    low_bad = min is not None and (v <= min if min_open else v < min)
    high_bad = max is not None and (v >= max if max_open else v > max)
    if low_bad or high_bad:
        if what is None:
            parts = []
            if min is not None:
                parts.append(("> " if min_open else ">= ") + repr(min))
            if max is not None:
                parts.append(("< " if max_open else "<= ") + repr(max))
            what = "must be " + " and ".join(parts)
        raise ValueError(f"{type(obj).__name__}.{name} {what}, got {v!r}")


# --------------------------------------------------------------------------- YAML

# A config file has tens of values; YAML aliases may repeat a node, but a document whose aliases
# expand it beyond this many values (a "billion laughs" bomb: 408 bytes -> 10^9 strings) is refused
# before anything walks it.
YAML_MAX_NODES = 10_000


class YAMLTooLarge(ValueError):
    """A YAML document whose aliases expand it beyond YAML_MAX_NODES values (or refer to themselves)."""


def _expanded_size(root, limit: int) -> int:
    """Number of nodes of a composed YAML node graph with every alias expanded, stopping past ``limit``."""
    import yaml

    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = (node.value if isinstance(node, yaml.SequenceNode)
                        else [x for kv in node.value for x in kv])
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > limit:
                raise YAMLTooLarge(f"its aliases expand it to more than {limit} values")
            continue
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        if key in on_path:
            raise YAMLTooLarge("an alias refers to the node that contains it (a recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        children = node.value if isinstance(node, yaml.SequenceNode) else [x for kv in node.value for x in kv]
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, *, max_nodes: int = YAML_MAX_NODES):
    """``yaml.safe_load`` with a bound on alias expansion (:data:`YAML_MAX_NODES`): the node graph
    is measured after composing, before a single Python object is built. Raises YAMLTooLarge."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            if node is not None:
                _expanded_size(node, max_nodes)
            return node

    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader subclass)


class ConfigMixin:
    """to_dict / from_dict / JSON / YAML for a validated dataclass; unknown keys are an error.

    Field values are read as their declared types (:func:`coerce_fields`, called by each config's
    ``__post_init__``): bools from booleans, 1/0 or BOOL_WORDS, numbers from numbers or numeric
    strings, finite floats, strings only from strings; the error names the field.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = renamed_keys(cls, d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        return _written(json.dumps(self.to_dict(), indent=2) + "\n", path)

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        return _written(yaml.safe_dump(self.to_dict(), sort_keys=False), path)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path):
        p = Path(text_or_path)
        text = p.read_text() if "\n" not in str(text_or_path) and p.is_file() else str(text_or_path)
        return cls.from_dict(load_yaml(text) or {})


def check_choice(cls_name: str, name: str, value, choices) -> None:
    """Raise a ValueError naming ``cls_name.name`` and the valid values unless ``value`` is one."""
    if value not in choices:
        raise ValueError(f"{cls_name}.{name} must be one of {list(choices)}, got {value!r}")



# The paper trains k = 128 columns of 4096 on LLaMA2-7B; as a fraction that carries to any width.
PAPER_SALIENT_FRACTION = 128 / 4096

# Salience metrics computed from the weights alone (no calibration data): saliency.py, the
# GIFT-SW method, the PEFT tuner and the up-front dependency check all ask this one tuple.
STATLESS_METRICS = ("magnitude", "random")

# GIFT-SW's noise modes (docs/ARCHITECTURE.md, docs/methods.md#gift-noise): the paper's weight noise, the same
# Gaussian moved to the layer output, and none. A quantized layer supports "weight" and "none".
NOISE_MODES = ("weight", "output", "none")
# The modes a quantized layer supports (QuantizedSalientLinear.set_noise): output noise is not
# implemented there.
QUANTIZED_NOISE_MODES = tuple(m for m in NOISE_MODES if m != "output")

# GMT's mask ratio when the method is gmt and no ratio is given (docs/methods.md#gmt: 0.5 is within the
# paper's flat region for every task it reports).
GMT_DEFAULT_RATIO = 0.5


def salient_count(in_features: int, n_salient: int | None = None, salient_fraction: float | None = None,
                  *, name: str = "layer", quantized: bool = False) -> int:
    """Number of salient columns k of a layer with ``in_features`` inputs.

    ``n_salient`` wins; else k = round(salient_fraction * in_features), at least 1 unless the
    fraction is 0; with neither, the paper's ratio 128/4096. GIFT-SW needs k <= in_features; a
    quantized layer (``quantized=True``) must keep at least one integer column, so k < in_features.
    """
    if n_salient is not None:
        k = n_salient
    else:
        f = salient_fraction if salient_fraction is not None else PAPER_SALIENT_FRACTION
        k = 0 if f == 0 else max(1, round(f * in_features))
    if quantized and k >= in_features:
        raise ValueError(
            f"{k} salient columns for {name!r}, which has only {in_features} input features: "
            "at least one column must be quantized; use a smaller n_salient or salient_fraction"
        )
    if k > in_features:
        raise ValueError(
            f"n_salient={k} is larger than {name}'s {in_features} input features; "
            f"use a smaller n_salient or salient_fraction"
        )
    return k


def flag(default, help: str, *, choices=None, old_names: tuple[str, ...] = ()):
    """A dataclass field whose ``help`` the command line shows (``salientft <cmd> --help``).

    ``default=dataclasses.MISSING`` makes a required field (and a required flag). ``choices``, a
    sequence or a callable returning one (resolved when the flag is declared, so that a choice
    list living in a heavy module need not be imported with the config), limits the flag's values.
    ``old_names``: the field's earlier names (docs/configuration.md#names), still read from files
    (:func:`renamed_keys`) and accepted as hidden, deprecated flags.
    """
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if old_names:
        metadata["old_names"] = tuple(old_names)
    return field(default=default, metadata=metadata)


def renamed_keys(cls, d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with every field's old name (``old_names`` metadata) replaced by its current name, so
    that files written before a rename still read; both names at once is an error."""
    out = dict(d)
    for f in dataclasses.fields(cls):
        for old in f.metadata.get("old_names", ()):
            if old in out:
                if f.name in out:
                    raise ValueError(f"{cls.__name__}: {old!r} is the old name of {f.name!r}; give one of them")
                out[f.name] = out.pop(old)
    return out


def renamed_arguments(**renames: str):
    """Decorator: the keyword arguments of a public function that were renamed (``old="new"``,
    docs/configuration.md#names) still work, with a DeprecationWarning; both names at once is an
    error. An old name given None (unset, as files written before the rename hold it) is dropped."""
    import functools
    import warnings

    def wrap(fn):
        who = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs and kwargs[old] is None:
                    del kwargs[old]
                elif old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{who}(): {old}= is the old name of {new}=; give one of them")
                    warnings.warn(f"{who}(): {old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap


def accept_old_names(cls):
    """Class decorator (above ``@dataclass``): the constructor also takes every field's earlier
    names (``old_names`` metadata, :func:`flag`), as :func:`renamed_arguments` does."""
    renames = {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("old_names", ())}
    cls.__init__ = renamed_arguments(**renames)(cls.__init__)
    return cls
