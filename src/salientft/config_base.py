"""The bottom of the config layer: JSON/YAML round-trips, choice checks and the shared rules.

Every config dataclass in the package (GiftConfig, GMTConfig, QuantizeConfig, TrainConfig) builds
on ``ConfigMixin``; the rules two of them share (how many salient columns a layer gets, the noise
modes, GMT's default ratio) live here once so that they cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Any


def _written(text: str, path: str | Path | None) -> str:
    """Write ``text`` atomically to ``path`` (if given) and return it."""
    if path is not None:
        from ._io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return text


class ConfigMixin:
    """to_dict / from_dict / JSON / YAML for a validated dataclass; unknown keys are an error."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
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
        import yaml

        p = Path(text_or_path)
        text = p.read_text() if "\n" not in str(text_or_path) and p.is_file() else str(text_or_path)
        return cls.from_dict(yaml.safe_load(text) or {})


def check_choice(cls_name: str, name: str, value, choices) -> None:
    """Raise a ValueError naming ``cls_name.name`` and the valid values unless ``value`` is one."""
    if value not in choices:
        raise ValueError(f"{cls_name}.{name} must be one of {list(choices)}, got {value!r}")



# The paper trains k = 128 columns of 4096 on LLaMA2-7B; as a fraction that carries to any width.
PAPER_SALIENT_FRACTION = 128 / 4096

# Salience metrics computed from the weights alone (no calibration data): saliency.py, the
# GIFT-SW method, the PEFT tuner and the up-front dependency check all ask this one tuple.
STATLESS_METRICS = ("magnitude", "random")

# GIFT-SW's noise modes (docs/ARCHITECTURE.md, METHODS.md 1.3): the paper's weight noise, the same
# Gaussian moved to the layer output, and none. A quantized layer supports "weight" and "none".
NOISE_MODES = ("weight", "output", "none")
# The modes a quantized layer supports (QuantizedSalientLinear.set_noise): output noise is not
# implemented there.
QUANTIZED_NOISE_MODES = tuple(m for m in NOISE_MODES if m != "output")

# GMT's mask ratio when the method is gmt and no ratio is given (METHODS.md 2: 0.5 is within the
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


def flag(default, help: str, *, choices=None):
    """A dataclass field whose ``help`` the command line shows (``salientft <cmd> --help``).

    ``default=dataclasses.MISSING`` makes a required field (and a required flag). ``choices``, a
    sequence or a callable returning one (resolved when the flag is declared, so that a choice
    list living in a heavy module need not be imported with the config), limits the flag's values.
    """
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)
