"""Configuration dataclasses. Each validates itself on creation and round-trips through JSON/YAML."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


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
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            from ._io import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from ._io import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_text(text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | Path):
        import yaml

        p = Path(text_or_path)
        text = p.read_text() if "\n" not in str(text_or_path) and p.is_file() else str(text_or_path)
        return cls.from_dict(yaml.safe_load(text) or {})


def _choice(cls_name: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{cls_name}.{name} must be one of {list(choices)}, got {value!r}")


# The paper trains k = 128 columns of 4096 on LLaMA2-7B; as a fraction that carries to any width.
PAPER_SALIENT_FRACTION = 128 / 4096


@dataclass
class GiftConfig(ConfigMixin):
    """GIFT-SW: which columns to train and how to perturb the frozen rest (METHODS.md §1).

    Give ``n_salient`` (k columns in every layer) or ``salient_fraction`` (k = round(f * in),
    at least 1), not both; with neither, the paper's ratio 128/4096 is used.
    ``fp32_salient`` keeps the trainable columns in fp32 when the base is bf16/fp16.
    """

    NOISE_MODES: ClassVar[tuple[str, ...]] = ("weight", "output", "none")

    n_salient: int | None = None
    salient_fraction: float | None = None
    target_modules: list[str] | str | None = None
    noise: str = "weight"
    noise_bits: int = 4
    metric: str = "gift"
    seed: int = 0
    fp32_salient: bool = False

    def __post_init__(self):
        n = type(self).__name__
        if self.n_salient is not None and self.salient_fraction is not None:
            raise ValueError(f"{n}: give n_salient or salient_fraction, not both")
        if self.n_salient is not None:
            if isinstance(self.n_salient, bool) or not isinstance(self.n_salient, int) or self.n_salient < 1:
                raise ValueError(f"{n}.n_salient must be a positive integer, got {self.n_salient!r}")
        if self.salient_fraction is not None:
            f = self.salient_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"{n}.salient_fraction must be in (0, 1], got {f!r}")
            self.salient_fraction = float(f)
        _choice(n, "noise", self.noise, self.NOISE_MODES)
        if isinstance(self.noise_bits, bool) or not isinstance(self.noise_bits, int) or not 2 <= self.noise_bits <= 16:
            raise ValueError(f"{n}.noise_bits must be an integer in [2, 16], got {self.noise_bits!r}")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"{n}.target_modules must be a non-empty list of names, a regex string, or None")
            self.target_modules = list(self.target_modules)
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(f"{n}.target_modules must be a list of names, a regex string, or None")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"{n}.metric must be a metric name such as 'gift'")
        if not isinstance(self.seed, int):
            raise ValueError(f"{n}.seed must be an integer")

    def k_for(self, in_features: int, name: str = "layer") -> int:
        """Number of salient columns for a layer with ``in_features`` inputs (validated)."""
        if self.n_salient is not None:
            k = self.n_salient
        else:
            f = self.salient_fraction if self.salient_fraction is not None else PAPER_SALIENT_FRACTION
            k = max(1, round(f * in_features))
        if k > in_features:
            raise ValueError(
                f"n_salient={k} is larger than {name}'s {in_features} input features; "
                f"use a smaller n_salient or salient_fraction"
            )
        return k
