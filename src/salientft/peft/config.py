"""GiftSWConfig: GIFT-SW as a PEFT config (a ``PeftConfig`` under the string peft type ``GIFT_SW``)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig

from ..adapter_format import PEFT_TYPE
from ..config_base import NOISE_MODES, accept_old_names, check_range, coerce_fields, salient_count
from ..gift.config import SETTINGS, GiftConfig, check_noise_settings, check_salient_count, gift_field


@accept_old_names  # adapter_config.json files written before the rename hold "scores_file"
@dataclass
class GiftSWConfig(PeftConfig):
    """Train the k salient input columns of every targeted linear layer and, per expert, of every
    targeted fused MoE expert projection (GIFT-SW, docs/moe.md).

    k per layer: ``n_salient``, or ``round(salient_fraction * in_features)``, or the paper's
    128/4096 of ``in_features``; ``k_pattern`` overrides it per layer (keys match a module name
    or its suffix, like LoRA's ``rank_pattern``). Columns: the top-k of ``metric`` — the
    statistics-free ``magnitude`` and ``random`` work inside ``get_peft_model``; the calibration
    metrics (``gift``, ``wanda``, ...) need ``scores`` (a file of ``salientft calibrate``) or a
    :func:`salientft.peft.preprocess_gift_sw` call on calibration batches first. ``noise`` and
    ``noise_bits`` set the noise in the frozen rest during training (``weight`` is the paper's);
    ``keep_noise`` keeps each layer's weight noise from forward to backward instead of drawing it
    again (faster; one (out, in) tensor per layer in the compute dtype until backward).
    ``salient_indices_in_adapter`` is set once the columns are chosen: a saved adapter carries
    its indices and noise scale, and loading it never re-selects them.
    """

    target_modules: Optional[Union[list[str], str]] = gift_field("target_modules")
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to leave out"})
    n_salient: Optional[int] = gift_field("n_salient")
    salient_fraction: Optional[float] = gift_field("salient_fraction")
    k_pattern: dict = field(default_factory=dict, metadata={"help": "per-layer k: {name or suffix regex: k}"})
    metric: str = gift_field("metric")
    noise: str = gift_field("noise")
    noise_bits: int = gift_field("noise_bits")
    keep_noise: bool = gift_field("keep_noise")
    seed: int = gift_field("seed")
    scores: Optional[str] = field(default=None, metadata={"help": "scores file from salientft calibrate",
                                                          "old_names": ("scores_file",)})
    fp32_salient: bool = gift_field("fp32_salient")
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules trained in full"})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "embedding rows to train (PEFT's trainable tokens)"},
    )
    salient_indices_in_adapter: bool = field(
        default=False, metadata={"help": "set by salientft: the adapter holds its indices (do not re-select)"},
    )
    base_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "set by salientft: SHA-256 of the targeted base weights (bf16) the "
                                        "columns were chosen on; loading onto other weights warns"},
    )
    salientft_base_model: Optional[str] = field(
        default=None, metadata={"help": "set by salientft: the base as salientft loads it (a preset name such as "
                                        "'tiny-random-llama' that base_model_name_or_path cannot hold)"},
    )

    def __post_init__(self):
        # GIFT-SW's own fields as their declared types (an adapter_config.json's "false" is false);
        # PeftConfig's fields are PEFT's to check
        coerce_fields(self, only=_OWN_FIELDS)
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.target_modules is None:  # GiftConfig's default: every linear layer of the blocks
            self.target_modules = "all-linear"
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        # GiftConfig's checks, on these fields (the messages name GiftSWConfig); the metric name here.
        check_salient_count(self)
        check_noise_settings(self, self.noise)
        check_range(self, "seed", min=0, max=2**32 - 1)
        from ..saliency import METRICS

        if self.metric not in METRICS:
            raise ValueError(f"GiftSWConfig.metric must be one of {list(METRICS)}, got {self.metric!r}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"GiftSWConfig.noise must be one of {list(NOISE_MODES)}, got {self.noise!r}")
        for key, k in (self.k_pattern or {}).items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"GiftSWConfig.k_pattern[{key!r}] must be a positive integer, got {k!r}")

    def gift_config(self) -> GiftConfig:
        """The shared settings as a GiftConfig (checked already, by ``__post_init__``)."""
        return GiftConfig(**{name: getattr(self, name) for name in SETTINGS})

    def k_for(self, module_name: str, in_features: int) -> int:
        """k of the layer ``module_name`` (``k_pattern`` first, then the config-wide rule)."""
        for key, k in (self.k_pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                return salient_count(in_features, k, name=module_name)
        return salient_count(in_features, self.n_salient, self.salient_fraction, name=module_name)

    def _scores(self) -> Optional[dict]:
        """The preprocessed scores (``preprocess_gift_sw``), else those of the file ``scores``, else None."""
        from ..saliency import load_scores

        scores = getattr(self, "_salient_scores", None)
        if scores is None and self.scores:
            scores = load_scores(self.scores)
            object.__setattr__(self, "_salient_scores", scores)
        return scores

    def _no_scores(self, name: str) -> ValueError:
        return ValueError(f"the salience scores have no entry for {name!r}; compute them for this model "
                          "(salientft calibrate, or salientft.peft.preprocess_gift_sw) with the same target modules")

    def _needs_statistics(self) -> ValueError:
        return ValueError(
            f"metric {self.metric!r} needs calibration statistics: give scores=<salientft calibrate output>, "
            "call salientft.peft.preprocess_gift_sw(model, config, batches) before get_peft_model, "
            "or use metric='magnitude' or 'random'"
        )

    def expert_scores_for(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """[experts, in] salience of a fused expert projection (``name``: the 3-D parameter's full name,
        ``weight`` its [experts, out, in] view), scored per expert as ``salientft.apply_gift`` does."""
        from ..gift.experts import expert_scores
        from ..gift.model import expert_score_matrix
        from ..saliency import STATLESS_METRICS

        scores = self._scores()
        if scores is not None:
            if name not in scores and f"{name}.0" not in scores:
                raise self._no_scores(name)
            return expert_score_matrix(name, scores, weight.shape[0], weight.shape[2])
        if self.metric not in STATLESS_METRICS:
            raise self._needs_statistics()
        return expert_scores(None, [name], self.metric, seed=self.seed, weights={name: weight})[name]

    def scores_for(self, module_name: str, weight: torch.Tensor) -> torch.Tensor:
        """(in,) salience of the layer's columns: preprocessed or file scores, else a statistics-free metric."""
        from ..saliency import STATLESS_METRICS, layer_scores

        scores = self._scores()
        if scores is not None:
            if module_name not in scores:
                raise self._no_scores(module_name)
            score = scores[module_name].float().flatten()
            if score.numel() != weight.shape[1]:
                raise ValueError(f"scores for {module_name!r} have {score.numel()} entries, the layer {weight.shape[1]}")
            return score
        if self.metric not in STATLESS_METRICS:
            raise self._needs_statistics()
        return layer_scores(module_name, weight, self.metric, seed=self.seed)


# The fields GiftSWConfig declares itself (type-checked in __post_init__), not PeftConfig's.
_OWN_FIELDS = tuple(GiftSWConfig.__annotations__)
