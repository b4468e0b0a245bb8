"""GIFT-SW (docs/methods.md#gift-sw): train the k salient input columns of every target layer.

``gift-sw`` perturbs the frozen rest with the paper's noise (weight noise by default);
``salient`` is the same without noise. A checkpoint holds only the adapter (indices and trained
columns, about k/in of the targeted weights) instead of the full model; the finished run writes
``adapter/`` and, with ``merge``, a plain ``merged/`` model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..devices import model_device
from ..gift import GiftConfig, apply_gift, gift_layers, load_adapter, merge_gift, read_adapter, save_adapter
from ..gift.adapter import attach_columns, column_tensors, remember_base_fingerprint
from ..gift.model import gift_scores
from ..saliency import METRICS, STATLESS_METRICS
from .base import Method, register
from .sharding import base_fingerprint, computed_once, gathered, is_writer, load_full_


def gift_settings(**kwargs) -> GiftConfig:
    """A GiftConfig from a run's TrainConfig settings; its errors name the TrainConfig fields."""
    try:
        return GiftConfig(**kwargs)
    except ValueError as e:
        raise ValueError(str(e).replace("GiftConfig", "TrainConfig")) from None


def refuse_noise(config) -> None:
    """The noise-free GIFT-SW methods refuse a noise mode other than none."""
    if config.noise not in (None, "none"):
        raise ValueError(
            f"TrainConfig: method 'salient' is GIFT-SW without noise; use --method gift-sw --noise {config.noise}"
        )


@register
class GiftSW(Method):
    name = "gift-sw"
    summary = "salient columns + noise in the frozen rest (the paper's method)"
    default_lr = 1e-4  # docs/methods.md#gift-paper-results
    default_noise = "weight"
    uses = frozenset({"n_salient", "salient_fraction", "metric", "scores", "noise", "noise_bits", "fp32_salient",
                      "calib_samples", "target_modules", "keep_noise"})

    def noise(self, config) -> str:
        return config.noise or self.default_noise

    def validate(self, config) -> None:
        """Everything GIFT-SW can check before a model loads: the GiftConfig (k, noise bits,
        targets), the metric's name and the scores file."""
        super().validate(config)
        self.gift_config(config)
        if config.metric not in METRICS:
            raise ValueError(f"TrainConfig: unknown salience metric {config.metric!r} (--metric); "
                             f"choose one of {', '.join(METRICS)}")
        if config.scores is not None and not Path(config.scores).is_file():
            raise FileNotFoundError(f"--scores {config.scores}: no such file; give a scores file written by "
                                    "salientft calibrate")

    def gift_config(self, config) -> GiftConfig:
        """The GiftConfig of this run; a 16-bit run (bf16 or fp16) keeps the trainable columns in fp32:
        fp16 gradients cannot go through fp16's GradScaler ("Attempting to unscale FP16 gradients"),
        and a 16-bit AdamW step of 1e-4 on a weight of 0.05 is rounded away."""
        return gift_settings(
            n_salient=config.n_salient, salient_fraction=config.salient_fraction,
            target_modules=config.target_modules, noise=self.noise(config), noise_bits=config.noise_bits,
            metric=config.metric, seed=config.seed, fp32_salient=config.fp32_salient or config.dtype in ("bf16", "fp16"),
            keep_noise=config.keep_noise,
        )

    def prepare(self, model, config, data=None, scores=None, noise_std=None, **_):
        """Salient columns and noise scales on every target, then the base fingerprint, while the
        weights are whole (before any sharding). Under torchrun the calibration and the fingerprint
        run on rank 0 only and their results go to every rank (``sharding.computed_once``): the same
        columns everywhere."""
        gcfg = self.gift_config(config)
        if scores is None and config.scores:
            from ..saliency import load_scores

            scores = load_scores(config.scores)
        if scores is None and gcfg.metric not in STATLESS_METRICS:
            from ..data.chat import calibration_batches_from_dataset

            def calibrated():
                batches = calibration_batches_from_dataset(data, n_samples=config.calib_samples, batch_size=8,
                                                          seed=config.seed)
                return gift_scores(model, gcfg, batches)

            scores = computed_once(calibrated, model_device(model))
        model = apply_gift(model, gcfg, scores, noise_std=noise_std)
        # hashed once, by rank 0 (every rank holds the same whole base here), kept on every rank
        model.salientft_base_fingerprint = computed_once(lambda: remember_base_fingerprint(model), model_device(model))
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
    default_noise = "none"

    def validate(self, config) -> None:
        super().validate(config)
        refuse_noise(config)
