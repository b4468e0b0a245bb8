"""The flags of ``salientft calibrate`` and ``salientft quantize``, as dataclasses: one field per flag.

``salientft.cli`` turns every field into a ``--kebab-case`` flag whose ``--help`` is the field's
help text and its default (``cli._config_flags``). The flags both commands share (the model, the
calibration data, the number of salient columns, the metric) are declared once, in
``CalibrationArgs``; each command adds its own in a subclass, and ``COMMANDS`` names the
subcommands. A field without a default (``REQUIRED``) is a required flag; the fields of each
group in ``EXCLUSIVE`` are mutually exclusive flags; ``choices`` metadata limits a flag's values.
``OUTPUTS`` names the flags that are output paths (``"file"`` or ``"dir"``): the command line
checks them writable before it loads a model.

Cheap to import (no torch): the metric names are read from ``salientft.saliency`` only when the
parser is built.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import ClassVar

from .config_base import ConfigMixin, check_range, coerce_fields, flag

REQUIRED = MISSING  # flag(REQUIRED, help): a field, and a flag, without a default


def _metrics() -> tuple[str, ...]:
    from .saliency import METRICS

    return METRICS


@dataclass(kw_only=True)
class CalibrationArgs(ConfigMixin):
    """What calibrate and quantize share: the model, the calibration data, k and the metric.

    Built from the parsed flags before any work (``salientft.cli``): every value is read as its
    field's type and every number checked against its bounds (``_check``)."""

    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("n_salient", "salient_fraction"),)

    model: str = flag("smollm2-135m", "base model: preset (smollm2-135m, tiny-random-llama), folder or hub id")
    data: str = flag("embedded", "calibration data: 'embedded', a .txt/.jsonl file, or a Hugging Face dataset name")
    calib_samples: int = flag(128, "number of calibration samples", old_names=("samples",))
    seq_len: int = flag(512, "tokens per calibration sample")
    batch_size: int = flag(8, "calibration samples per forward pass")
    n_salient: int | None = flag(None, "salient columns k per layer (calibrate: for the plot and metadata; "
                                       "quantize: kept in 16 bits, 0 for none)")
    salient_fraction: float | None = flag(None, "k as a fraction of a layer's in_features, 0 for none "
                                                "(default without either flag: the paper's 128/4096)")
    metric: str = flag("gift", "salience metric", choices=_metrics)
    target_modules: list[str] | str | None = flag(None, "target layers: 'q_proj,v_proj' or 're:<regex>' "
                                                        "(default: all linear layers of the blocks)")
    seed: int = flag(0, "random seed (calibration samples, metric 'random')")
    dtype: str = flag("bf16", "model dtype: bf16, fp16 or fp32")
    device: str = flag("auto", "where the model loads and every step runs: auto (CUDA if available, else CPU), "
                               "cpu, cuda or cuda:N")
    sequential: bool = flag(False, "one decoder block at a time on the device, each read from the model's "
                                   "safetensors files for its turn (same results; also chosen when the weights "
                                   "do not fit the device's free memory)")

    def __post_init__(self):
        coerce_fields(self)
        self._check()

    def _check(self) -> None:
        for name in ("calib_samples", "batch_size"):
            check_range(self, name, min=1, what="must be a positive integer")
        check_range(self, "seq_len", min=2, what="must be at least 2 tokens")
        check_range(self, "n_salient", min=0, what="must be >= 0 (0: no salient columns)")
        check_range(self, "salient_fraction", min=0, max=1)
        check_range(self, "seed", min=0, max=2**32 - 1)
        from .models import resolve_dtype

        resolve_dtype(self.dtype)
        if isinstance(self.target_modules, str):
            from .targets import compile_target_regex

            compile_target_regex(self.target_modules)


@dataclass(kw_only=True)
class CalibrateArgs(CalibrationArgs):
    """``salientft calibrate``: the shared flags, the metric's parameters and the outputs."""

    OUTPUTS: ClassVar[dict[str, str]] = {"output": "file", "stats_output": "file", "plot": "file"}

    bits: int = flag(4, "quantizer bits for D = W - Q(W)")
    tau: str | None = flag(None, "weight-error norm: 1, 2 or inf (gift/gift-g2 only)")
    rho: str | None = flag(None, "activation norm: 1, 2 or inf (gift/gift-g2 only)")
    gamma: float | None = flag(None, "activation exponent: 0.5, 1 or 2 (gift/gift-g2 only)")
    output: str = flag(REQUIRED, "scores file (.safetensors)")
    stats_output: str | None = flag(None, "also save the activation statistics (.safetensors)")
    plot: str | None = flag(None, "PNG summary of the scores")

    def _check(self) -> None:
        super()._check()
        check_range(self, "bits", min=2, max=16)
        from .saliency import resolve_metric

        resolve_metric(self.metric, tau=self.tau, rho=self.rho, gamma=self.gamma)  # before the model loads


@dataclass(kw_only=True)
class QuantizeArgs(CalibrationArgs):
    """``salientft quantize``: the shared flags, the quantizer and the output folder."""

    OUTPUTS: ClassVar[dict[str, str]] = {"output": "dir"}

    bits: int = flag(REQUIRED, "bits per weight: 2, 3, 4 or 8")
    quantizer: str = flag("gptq", "quantizer: gptq (error-compensating) or rtn (round to nearest)",
                          choices=("gptq", "rtn"), old_names=("method",))
    group_size: int | None = flag(None, "scale per group of columns (default: per row)")
    scores: str | None = flag(None, "precomputed scores file from salientft calibrate")
    no_progress: bool = flag(False, "no progress bars")
    output: str = flag(REQUIRED, "output folder (refused if it holds anything salientft did not write)")
    overwrite: bool = flag(False, "replace an earlier salientft output in --output (only what its manifest lists)")

    def _check(self) -> None:
        super()._check()
        from .quant.model import QuantizeConfig

        QuantizeConfig(bits=self.bits, quantizer=self.quantizer, n_salient=self.n_salient,
                       salient_fraction=self.salient_fraction, group_size=self.group_size, metric=self.metric,
                       target_modules=self.target_modules)


# subcommand -> (its flags, its line in `salientft --help`, its description in `salientft <name> --help`)
COMMANDS = {
    "calibrate": (CalibrateArgs, "score every target layer's input columns (salience)",
                  "Run calibration data through a model and write per-column salience scores (safetensors) "
                  "and optionally a PNG summary."),
    "quantize": (QuantizeArgs, "quantize to 2-8 bits keeping the salient columns in 16 bits (GPTQ or RTN)",
                 "Weight-only symmetric quantization of every target layer; the k salient columns stay 16-bit "
                 "(docs/methods.md#quantization-recovery). Writes a folder load_quantized() reads."),
}
