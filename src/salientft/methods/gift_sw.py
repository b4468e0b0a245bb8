"""GIFT-SW (docs/methods.md#gift-sw): train the k salient input columns of every target layer.

``gift-sw`` perturbs the frozen rest with the paper's noise (weight noise by default);
``salient`` is the same without noise. A checkpoint holds only the adapter (indices and trained
columns, about k/in of the targeted weights) instead of the full model; the finished run writes
``adapter/`` and, with ``merge``, a plain ``merged/`` model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config_base import NOISE_MODES, check_range, flag
from ..devices import model_device, resolve_device
from ..gift import GiftConfig, apply_gift, gift_layers, load_adapter, merge_gift, read_adapter, save_adapter
from ..gift.adapter import attach_columns, column_tensors, remember_base_fingerprint
from ..gift.config import check_noise_settings, check_salient_count, check_targets, gift_field
from ..gift.model import gift_scores
from ..models import block_source, exceeds_free_memory, needs_blockwise
from ..saliency import METRICS, STATLESS_METRICS
from .base import Method, MethodConfig, merge_field, register, targets_field
from .sharding import base_fingerprint, computed_once, gathered, is_writer, load_full_


@dataclass
class NoiseSettings(MethodConfig):
    """GIFT-SW's noise (docs/methods.md#gift-noise): the mode (None: the method's default) and its scale."""

    NOISE_MODES = NOISE_MODES  # what this kind of method supports

    noise: str | None = flag(None, "GIFT-SW's noise: weight, output or none (default: weight for gift-sw, none for "
                                   "salient, full, gmt; full/gmt add it to every weight of the target layers, all "
                                   "still training)")
    noise_bits: int = gift_field("noise_bits")

    default_noise = "weight"  # not a field: the mode an unset ``noise`` means (the method's)

    def noise_mode(self) -> str:
        return self.noise or self.default_noise

    def check(self) -> None:
        check_noise_settings(self, self.noise_mode(), self.NOISE_MODES)


@dataclass
class DenseNoiseSettings(NoiseSettings):
    """The noise on GIFT-SW's target layers: also whether it is kept for backward, and the targets."""

    keep_noise: bool = gift_field("keep_noise")
    target_modules: list[str] | str | None = targets_field()

    def check(self) -> None:
        super().check()
        check_targets(self)


@dataclass
class GiftSWMethodConfig(DenseNoiseSettings):
    """``gift-sw``'s settings: which columns train (k, the metric or a scores file, the calibration
    samples of a data-dependent metric), the noise in the frozen rest, and ``merge``. The defaults
    and help of GiftConfig's settings are GiftConfig's (``gift_field``: one declaration)."""

    n_salient: int | None = gift_field("n_salient")
    salient_fraction: float | None = gift_field("salient_fraction")
    metric: str = gift_field("metric")
    scores: str | None = flag(None, "precomputed scores file from salientft calibrate")
    fp32_salient: bool = gift_field("fp32_salient")
    calib_samples: int = flag(128, "calibration samples for data-dependent metrics")
    sequential_calibration: bool | None = flag(
        None, "calibrate one decoder block at a time, the base left in host memory and each block visiting the "
              "device for its turn (same scores); default: when the base does not fit the device "
              "(docs/quantization.md#block-by-block)")
    merge: bool = merge_field()

    def check(self) -> None:
        super().check()
        check_salient_count(self)
        check_range(self, "calib_samples", min=1, what="must be a positive integer")
        if self.metric not in METRICS:
            raise ValueError(f"{type(self).__name__}: unknown salience metric {self.metric!r} (--metric); "
                             f"choose one of {', '.join(METRICS)}")
        if self.scores is not None and not Path(self.scores).is_file():
            raise FileNotFoundError(f"--scores {self.scores}: no such file; give a scores file written by "
                                    "salientft calibrate")


def _calibration_device(model, config) -> tuple[torch.device, bool]:
    """(where GIFT-SW's calibration runs, whether block by block): the run's device, block by block,
    when asked or (unset) when the base is in host memory and does not fit the run's device (the
    rule of ``GiftSW.base_device``, applied to the model in memory); else the model's device."""
    asked, home = config.method_config.sequential_calibration, model_device(model)
    if asked is False or (asked is None and home.type != "cpu"):
        return home, False
    run = resolve_device(config.device)
    if asked is None and run.type != "cpu":
        asked = exceeds_free_memory(sum(p.numel() * p.element_size() for p in model.parameters()), run, warn=False)
    return (run, True) if asked else (home, False)


def refuse_noise(settings: NoiseSettings) -> None:
    """The noise-free GIFT-SW methods refuse a noise mode other than none."""
    if settings.noise not in (None, "none"):
        raise ValueError(
            f"{type(settings).__name__}: method {settings.method_name!r} is GIFT-SW without noise; use --method gift-sw "
            f"--noise {settings.noise}"
        )


@dataclass
class SalientMethodConfig(GiftSWMethodConfig):
    """``salient``'s settings: GIFT-SW's, without noise."""

    default_noise = "none"

    def check(self) -> None:
        refuse_noise(self)
        super().check()


@register
class GiftSW(Method):
    name = "gift-sw"
    summary = "salient columns + noise in the frozen rest (the paper's method)"
    config_class = GiftSWMethodConfig
    default_lr = 1e-4  # docs/methods.md#gift-paper-results

    def gift_config(self, config) -> GiftConfig:
        """The GiftConfig of this run; a 16-bit run (bf16 or fp16) keeps the trainable columns in fp32:
        fp16 gradients cannot go through fp16's GradScaler ("Attempting to unscale FP16 gradients"),
        and a 16-bit AdamW step of 1e-4 on a weight of 0.05 is rounded away."""
        s = config.method_config
        return GiftConfig(
            n_salient=s.n_salient, salient_fraction=s.salient_fraction, target_modules=s.target_modules,
            noise=s.noise_mode(), noise_bits=s.noise_bits, metric=s.metric, seed=config.seed,
            fp32_salient=s.fp32_salient or config.dtype in ("bf16", "fp16"), keep_noise=s.keep_noise,
        )

    def sequential_calibration(self, config, device) -> bool:
        """Whether the run calibrates block by block: as asked, else (unset) when the base does not
        fit ``device`` (``models.needs_blockwise``: the rule of calibrate and quantize)."""
        asked = config.method_config.sequential_calibration
        if asked is not None:
            return asked
        return needs_blockwise(self.base_source(config), self.master_dtype(config), device)

    def base_device(self, config, device) -> torch.device:
        """Block by block, the base stays in host memory (blocks visit ``device`` during calibration;
        the Trainer, or FSDP2 shard by shard, then places it)."""
        return torch.device("cpu") if self.sequential_calibration(config, device) else device

    def prepare(self, model, config, data=None, scores=None, noise_std=None, **_):
        """Salient columns and noise scales on every target, then the base fingerprint, while the
        weights are whole (before any sharding). Under torchrun the calibration and the fingerprint
        run on rank 0 only and their results go to every rank (``sharding.computed_once``): the same
        columns everywhere. With ``sequential_calibration``, or unset for a base in host memory that
        does not fit the run's device (``base_device``), block by block on the run's device."""
        gcfg = self.gift_config(config)
        settings = config.method_config
        device, sequential = _calibration_device(model, config)
        if scores is None and settings.scores:
            from ..saliency import load_scores

            scores = load_scores(settings.scores)
        if scores is None and gcfg.metric not in STATLESS_METRICS:
            from ..data.chat import calibration_batches_from_dataset

            def calibrated():
                batches = calibration_batches_from_dataset(data, calib_samples=settings.calib_samples, batch_size=8,
                                                          seed=config.seed)
                if not sequential:
                    return gift_scores(model, gcfg, batches)
                home = model_device(model)  # inside the block the embeddings are on ``device``
                with block_source(model, device) as blocks:
                    return {k: v.to(home) for k, v in gift_scores(model, gcfg, batches, blocks).items()}

            scores = computed_once(calibrated, device)
        model = apply_gift(model, gcfg, scores, noise_std=noise_std)
        # hashed once, by rank 0 (every rank holds the same whole base here), kept on every rank
        model.salientft_base_fingerprint = computed_once(lambda: remember_base_fingerprint(model), device)
        return model

    def save_checkpoint(self, model, directory: Path) -> bool:
        """The adapter only. Under FSDP2 (called on every rank) only the trained columns are
        gathered; the base fingerprint is the one computed before sharding."""
        fp = base_fingerprint(model)
        with gathered(model, trainable_only=True):
            if is_writer():
                save_adapter(model, Path(directory) / "adapter", base_fingerprint=fp)
        return True

    def gather_trained(self, model) -> dict:
        """Every rank: what rank 0 needs to rebuild the trained model on a fresh base (the adapter's
        tensors, settings and base fingerprint), gathering only the trained columns."""
        fp = base_fingerprint(model)
        with gathered(model, trainable_only=True):
            tensors = column_tensors(model) if is_writer() else None
        return {"tensors": tensors, "config": model.salientft_gift_config, "fingerprint": fp}

    def attach_trained(self, base, trained: dict):
        """The trained model on a freshly loaded ``base``: the gathered columns, indices and noise
        scales applied as a saved adapter is (no scores, no calibration, no noise scale computed)."""
        names = sorted({k.rpartition(".")[0] for k in trained["tensors"]})
        return attach_columns(base, trained["config"], trained["tensors"], names, trained["fingerprint"])

    def load_checkpoint(self, model, directory: Path) -> bool:
        adapter = Path(directory) / "adapter"
        if not adapter.is_dir():
            return False
        _, tensors = read_adapter(adapter)
        with torch.no_grad():
            for name, layer in gift_layers(model).items():
                if not torch.equal(tensors[f"{name}.salient_idx"].to(layer.salient_idx.device), layer.salient_idx):
                    raise ValueError(
                        f"checkpoint {directory} chose other salient columns for {name}; "
                        "resume with the same model, data, metric and seed"
                    )
                load_full_(layer.salient_weight, tensors[f"{name}.salient_weight"])  # sharded too
        return True

    mergeable = True

    def save_output(self, model, tokenizer, config, out: Path) -> None:
        """The GIFT-SW adapter (PEFT's format): indices, trained columns, noise scale, the base's fingerprint."""
        save_adapter(model, out / "adapter", base_model=config.model)

    def merge(self, model):
        """The trained columns written into the base weights: a plain transformers model."""
        return merge_gift(model)

    def attach(self, base, out: Path, check_base: bool = True):
        """Refuses a base other than the one trained on (fingerprint of the targeted weights)
        unless ``check_base=False``."""
        return load_adapter(base, Path(out) / "adapter", check_base=check_base)


@register
class Salient(GiftSW):
    name = "salient"
    summary = "salient columns only, no noise"
    config_class = SalientMethodConfig
