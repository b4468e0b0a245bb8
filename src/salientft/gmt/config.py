"""GMT's settings: the validated, JSON/YAML round-tripping ``GMTConfig`` and the roles it excludes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config_base import GMT_DEFAULT_RATIO, ConfigMixin, check_choice, coerce_fields

# Embeddings and the output head are not masked by default; docs/gmt.md says why. They are found by
# role, not by name (GPT-NeoX's embed_in, OPT's embed_positions have names of their own):
#   "@embeddings": model.get_input_embeddings() and every nn.Embedding (learned positions: GPT-2's wpe,
#                  OPT's embed_positions; token types), all lookup tables with row-sparse gradients;
#   "@output":     model.get_output_embeddings() (lm_head, GPT-NeoX's embed_out, ...).
# Given parameters instead of a model, a role falls back to the usual names of its modules.
ROLES = {"@embeddings": ("embed_tokens", "embed_in", "wte", "wpe", "embed_positions", "word_embeddings"),
         "@output": ("lm_head", "embed_out", "output_layer")}
GMT_DEFAULT_EXCLUDE = ("@embeddings", "@output")


@dataclass
class GMTConfig(ConfigMixin):
    """GMT: before each optimizer step, zero the smallest accumulated gradients (docs/methods.md#gmt).

    ``ratio`` is the fraction of gradient entries zeroed (the paper's mask ratio), in [0, 1).
    ``granularity``: "tensor" (one threshold per parameter tensor) or "global" (one threshold over
    every masked parameter). ``mode``: "paper" (zero the gradient, optimizer untouched) or
    "strict" (masked entries get no update of any kind in that step, see docs/gmt.md).
    ``exclude``: what is left unmasked (trained densely): the roles "@embeddings" (input and
    position embeddings) and "@output" (the output head), found by role (the default); a plain
    entry matches a dotted component path of the name ("lm_head" matches "lm_head.weight"), an
    entry with ``* ? [`` is a glob over the full name. ``global_cache_mb``: memory the global threshold may
    use to keep the top 16 bits of the gradients between its passes (2 bytes per entry); above
    it they are recomputed (one more read of the gradients). Nothing is ever concatenated.
    """

    GRANULARITIES: ClassVar[tuple[str, ...]] = ("tensor", "global")
    MODES: ClassVar[tuple[str, ...]] = ("paper", "strict")

    ratio: float = GMT_DEFAULT_RATIO
    granularity: str = "tensor"
    mode: str = "paper"
    exclude: list[str] = field(default_factory=lambda: list(GMT_DEFAULT_EXCLUDE))
    global_cache_mb: int = 256

    def __post_init__(self):
        n = type(self).__name__
        if self.exclude is None:
            self.exclude = []
        coerce_fields(self)  # every field as its declared type (config_base)
        c = self.global_cache_mb
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"{n}.global_cache_mb must be a non-negative integer (MiB), got {c!r}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(
                f"{n}.ratio is the fraction of gradient entries zeroed and must be in [0, 1), got {r!r}"
            )
        self.ratio = float(r)
        check_choice(n, "granularity", self.granularity, self.GRANULARITIES)
        check_choice(n, "mode", self.mode, self.MODES)
        if self.exclude is None:
            self.exclude = []
        if isinstance(self.exclude, str) or not isinstance(self.exclude, (list, tuple)):
            raise ValueError(f"{n}.exclude must be a list of parameter-name patterns, got {self.exclude!r}")
        if not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"{n}.exclude entries must be non-empty strings, got {self.exclude!r}")
        unknown = [p for p in self.exclude if p.startswith("@") and p not in ROLES]
        if unknown:
            raise ValueError(f"{n}.exclude: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
        self.exclude = list(self.exclude)
