"""Configuration dataclasses. Each validates itself on creation and round-trips through JSON/YAML."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


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


METHODS = ("gift-sw", "salient", "gmt", "full", "lora", "dora", "ste")
# Learning rates of METHODS.md §1.7 (LLaMA2): GIFT-SW 1e-4, the baselines 3e-5.
DEFAULT_LR = {"gift-sw": 1e-4, "salient": 1e-4, "gmt": 3e-5, "full": 3e-5, "lora": 3e-5, "dora": 3e-5, "ste": 3e-5}
# Recovery of a model written by `salientft quantize` (METHODS.md §1.6) and its baselines.
QUANTIZED_METHODS = ("gift-sw", "salient", "ste", "lora")


@dataclass
class TrainConfig(ConfigMixin):
    """Everything ``salientft train`` needs; every field is also a command-line flag.

    ``lr=None`` takes the method's default (DEFAULT_LR). ``max_steps`` wins over ``epochs``.
    ``n_salient``/``salient_fraction``/``metric``/``noise``/``noise_bits`` configure GIFT-SW;
    ``lora_r``/``lora_alpha`` the PEFT baselines; ``mask_*`` GMT (also on top of gift-sw).
    ``quantized`` names a folder written by ``salientft quantize``: gift-sw/salient then train its
    16-bit salient columns (noise at the 4-bit step), ``ste`` trains every weight through the
    same fake quantization, ``lora`` trains LoRA on the frozen quantized model.
    """

    model: str = "smollm2-135m"
    data: str = "embedded"
    output: str = "runs/default"
    method: str = "gift-sw"
    lr: float | None = None
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    packing: bool = False
    data_limit: int | None = None
    dtype: str = "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_steps: int = 0
    logging_steps: int = 1
    merge: bool = False
    # GIFT-SW
    n_salient: int | None = None
    salient_fraction: float | None = None
    metric: str = "gift"
    scores: str | None = None
    noise: str | None = None
    noise_bits: int = 4
    fp32_salient: bool = False
    calib_samples: int = 128
    target_modules: list[str] | str | None = None
    # PEFT baselines
    lora_r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    # GMT
    mask_ratio: float | None = None
    mask_granularity: str = "tensor"
    mask_mode: str = "paper"
    # Evaluation before/after (the eval tasks, or "loss" for held-out loss only; "" for none)
    eval_tasks: str = ""
    eval_limit: int | None = None
    eval_before: bool = True  # False skips the before-training eval and held-out loss (many runs of one base)
    trust_remote_code: bool = False
    quantized: str | None = None

    def __post_init__(self):
        n = type(self).__name__
        _choice(n, "method", self.method, METHODS)
        _choice(n, "dtype", self.dtype, ("bf16", "fp32", "fp16"))
        for name in ("batch_size", "grad_accum", "max_length", "lora_r", "calib_samples", "logging_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n}.{name} must be a positive integer, got {v!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{n}.lr must be positive, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{n}.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"{n}.max_steps must be positive (or -1 to use epochs), got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ValueError(f"{n}.epochs must be positive, got {self.epochs}")
        if self.save_steps < 0:
            raise ValueError(f"{n}.save_steps must be >= 0 (0: no intermediate checkpoints)")
        if self.noise is not None:
            _choice(n, "noise", self.noise, GiftConfig.NOISE_MODES)
        if self.method == "salient" and self.noise not in (None, "none"):
            raise ValueError(f"{n}: method 'salient' is GIFT-SW without noise; use --method gift-sw --noise {self.noise}")
        if self.mask_ratio is not None and not 0 <= self.mask_ratio < 1:
            raise ValueError(f"{n}.mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        if self.mask_ratio is not None and self.method in ("lora", "dora"):
            raise ValueError(f"{n}: --mask-ratio applies to gmt, full, gift-sw and salient, not {self.method}")
        if self.eval_tasks:
            from .evaluation.tasks import parse_tasks

            parse_tasks(self.eval_tasks)  # unknown names fail now, not after training
        if self.quantized is not None and self.method not in QUANTIZED_METHODS:
            raise ValueError(f"{n}: --quantized recovers with one of {list(QUANTIZED_METHODS)}, not {self.method!r}")
        if self.method == "ste" and self.quantized is None:
            raise ValueError(f"{n}: method 'ste' trains a quantized model: give --quantized DIR (from salientft quantize)")
        _choice(n, "mask_granularity", self.mask_granularity, ("tensor", "global"))
        _choice(n, "mask_mode", self.mask_mode, ("paper", "strict"))
        if self.data_limit is not None and self.data_limit < 1:
            raise ValueError(f"{n}.data_limit must be positive")

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.method]

    def gift_config(self) -> GiftConfig:
        noise = "none" if self.method == "salient" else (self.noise or "weight")
        return GiftConfig(
            n_salient=self.n_salient, salient_fraction=self.salient_fraction,
            target_modules=self.target_modules, noise=noise, noise_bits=self.noise_bits,
            metric=self.metric, seed=self.seed, fp32_salient=self.fp32_salient,
        )


# Vocabulary matrices (input embeddings, lm_head) are not masked by default; docs/gmt.md says why.
GMT_DEFAULT_EXCLUDE = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "output_layer")


@dataclass
class GMTConfig(ConfigMixin):
    """GMT: before each optimizer step, zero the smallest accumulated gradients (METHODS.md §2).

    ``ratio`` is the fraction of gradient entries zeroed (the paper's mask ratio), in [0, 1).
    ``granularity``: "tensor" (one threshold per parameter tensor) or "global" (one threshold over
    every masked parameter). ``mode``: "paper" (zero the gradient, optimizer untouched) or
    "strict" (masked entries get no update of any kind in that step, see docs/gmt.md).
    ``exclude``: parameter-name patterns left unmasked (trained densely): a plain entry matches a
    dotted component path of the name ("lm_head" matches "lm_head.weight"), an entry with
    ``* ? [`` is a glob over the full name. ``global_cache_mb``: memory the global threshold may
    use to keep the top 16 bits of the gradients between its passes (2 bytes per entry); above
    it they are recomputed (one more read of the gradients). Nothing is ever concatenated.
    """

    GRANULARITIES: ClassVar[tuple[str, ...]] = ("tensor", "global")
    MODES: ClassVar[tuple[str, ...]] = ("paper", "strict")

    ratio: float
    granularity: str = "tensor"
    mode: str = "paper"
    exclude: list[str] = field(default_factory=lambda: list(GMT_DEFAULT_EXCLUDE))
    global_cache_mb: int = 256

    def __post_init__(self):
        n = type(self).__name__
        c = self.global_cache_mb
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"{n}.global_cache_mb must be a non-negative integer (MiB), got {c!r}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(
                f"{n}.ratio is the fraction of gradient entries zeroed and must be in [0, 1), got {r!r}"
            )
        self.ratio = float(r)
        _choice(n, "granularity", self.granularity, self.GRANULARITIES)
        _choice(n, "mode", self.mode, self.MODES)
        if self.exclude is None:
            self.exclude = []
        if isinstance(self.exclude, str) or not isinstance(self.exclude, (list, tuple)):
            raise ValueError(f"{n}.exclude must be a list of parameter-name patterns, got {self.exclude!r}")
        if not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"{n}.exclude entries must be non-empty strings, got {self.exclude!r}")
        self.exclude = list(self.exclude)
