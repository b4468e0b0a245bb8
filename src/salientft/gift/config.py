"""GiftConfig: which columns GIFT-SW trains and how it perturbs the frozen rest."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..config_base import NOISE_MODES, ConfigMixin, check_choice, check_range, coerce_fields, flag, salient_count


@dataclass
class GiftConfig(ConfigMixin):
    """GIFT-SW: which columns to train and how to perturb the frozen rest (docs/methods.md#gift-sw).

    Give ``n_salient`` (k columns in every layer) or ``salient_fraction`` (k = round(f * in),
    at least 1), not both; with neither, the paper's ratio 128/4096 is used.
    ``fp32_salient`` (default on) keeps the trainable columns in fp32 when the base is bf16/fp16:
    in 16 bits most small AdamW updates round away.
    ``keep_noise`` (weight noise only) keeps each layer's noisy weight from forward to backward
    instead of drawing the noise again: a faster step for one (out, in) tensor per layer in the
    compute dtype held until backward; same outputs and gradients. Off: the memory-lean default.
    """

    NOISE_MODES: ClassVar[tuple[str, ...]] = NOISE_MODES

    # The one declaration of each GIFT-SW setting: its default and its help. The PEFT config
    # (salientft.peft.GiftSWConfig) and the methods' configs / `salientft train` take both from here
    # (gift_field), so the three cannot drift apart.
    n_salient: int | None = flag(None, "salient columns k per layer")
    salient_fraction: float | None = flag(None, "k as a fraction of a layer's input features "
                                                "(neither: the paper's 128/4096)")
    target_modules: list[str] | str | None = flag(None, "layers to train: names or suffixes, or a regex "
                                                        "(default None = 'all-linear': every linear layer of the "
                                                        "transformer blocks, never lm_head or embeddings)")
    noise: str = flag("weight", "training noise in the frozen rest: weight (the paper's), output or none")
    noise_bits: int = flag(4, "quantizer bits whose step sets the noise scale")
    metric: str = flag("gift", "salience metric (salientft.METRICS; magnitude and random need no data)")
    seed: int = flag(0, "seed of the 'random' metric")
    fp32_salient: bool = flag(True, "keep the trainable columns in fp32 when the model is bf16/fp16 "
                                    "(16-bit columns lose most small AdamW updates)")
    keep_noise: bool = flag(False, "keep each layer's weight noise for backward instead of drawing it again "
                                   "(faster; one out x in tensor per layer)")

    def __post_init__(self):
        coerce_fields(self)  # every field as its declared type (config_base)
        check_salient_count(self)
        check_noise_settings(self, self.noise)
        check_targets(self)
        n = type(self).__name__
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"{n}.metric must be a metric name such as 'gift'")
        check_range(self, "seed", min=0, max=2**32 - 1)

    def k_for(self, in_features: int, name: str = "layer") -> int:
        """Number of salient columns for a layer with ``in_features`` inputs (validated)."""
        return salient_count(in_features, self.n_salient, self.salient_fraction, name=name)


# The checks GiftConfig and the GIFT-SW methods' configs (salientft.methods) share: each config
# holds its own copy of the fields (gift_field), and these name the config that holds them.

def check_salient_count(obj) -> None:
    """``n_salient`` (positive) or ``salient_fraction`` (in (0, 1]), not both."""
    n = type(obj).__name__
    if obj.n_salient is not None and obj.salient_fraction is not None:
        raise ValueError(f"{n}: give n_salient or salient_fraction, not both")
    check_range(obj, "n_salient", min=1, what="must be a positive integer")
    check_range(obj, "salient_fraction", min=0, max=1, min_open=True, what="must be in (0, 1]")


def check_noise_settings(obj, noise: str, modes=NOISE_MODES) -> None:
    """``noise`` (the mode in effect: a method config may leave it to the method) one of ``modes``,
    ``noise_bits`` in [2, 16], and ``keep_noise`` only with weight noise (when the config has it)."""
    n = type(obj).__name__
    check_choice(n, "noise", noise, modes)
    check_range(obj, "noise_bits", min=2, max=16, what="must be an integer in [2, 16]")
    if getattr(obj, "keep_noise", False) and noise != "weight":
        raise ValueError(f"{n}.keep_noise keeps the weight noise for backward: it needs noise='weight', "
                         f"not {noise!r}")


def check_targets(obj) -> None:
    """``target_modules``: None (PEFT's "all-linear" spelling too), a non-empty list of names, or a
    regex string (compiled now: a broken one is refused before any model loads)."""
    n = type(obj).__name__
    if obj.target_modules == "all-linear":  # PEFT's spelling of the same default set
        obj.target_modules = None
    if isinstance(obj.target_modules, (list, tuple)):
        if not obj.target_modules or not all(isinstance(t, str) and t for t in obj.target_modules):
            raise ValueError(f"{n}.target_modules must be a non-empty list of names, a regex string, or None")
        obj.target_modules = list(obj.target_modules)
    elif isinstance(obj.target_modules, str):
        from ..targets import compile_target_regex

        compile_target_regex(obj.target_modules)


# The settings an adapter records (everything but target_modules, which it lists by name).
SETTINGS = ("n_salient", "salient_fraction", "metric", "noise", "noise_bits", "keep_noise", "seed", "fp32_salient")


def gift_field(name: str, help_prefix: str = ""):
    """A dataclass field with GiftConfig's default and help for the setting ``name`` (for the
    configs that expose GIFT-SW's settings again: PEFT's GiftSWConfig, the GIFT-SW methods' configs)."""
    f = {f.name: f for f in dataclasses.fields(GiftConfig)}[name]
    return flag(f.default, help_prefix + f.metadata["help"])
