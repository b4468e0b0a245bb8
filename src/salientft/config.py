"""TrainConfig: everything one ``salientft train`` run needs; every field is a flag.

The method-specific rules (defaults, which flags apply, what a method refuses) live with the
method in ``salientft.methods``; this class validates the generic fields and asks the registry
for the rest. GiftConfig, GMTConfig and the shared helpers are re-exported from here for
backward compatibility (their homes: ``gift.config``, ``gmt``, ``config_base``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import methods as _methods
from .config_base import (  # noqa: F401  (re-exported)
    GMT_DEFAULT_RATIO,
    NOISE_MODES,
    PAPER_SALIENT_FRACTION,
    ConfigMixin,
    check_choice,
    check_range,
    coerce_fields,
    flag,
    salient_count,
)
from .devices import check_device_spec
from .gift.config import GiftConfig, gift_field  # noqa: F401  (GiftConfig re-exported)
from .gmt import GMT_DEFAULT_EXCLUDE, GMTConfig  # noqa: F401  (re-exported)


# TrainConfig.fsdp: "" (no sharding) or FSDP2's two sharding strategies (docs/distributed.md)
FSDP_MODES = ("", "full_shard", "shard_grad_op")


@dataclass
class TrainConfig(ConfigMixin):
    """Everything ``salientft train`` needs; every field is also a command-line flag.

    ``lr=None`` takes the method's default (``salientft.methods.get(name).default_lr``).
    ``max_steps`` wins over ``epochs``. ``quantized`` names a folder written by
    ``salientft quantize``: the method then recovers that quantized model
    (``salientft.methods.names(quantized=True)``). Every setting is validated on creation, before
    any model loads: a method-specific field (GIFT-SW's, LoRA's, GMT's, ``merge``) set to a value
    other than its default for a method that does not read it is refused
    (``salientft.methods.Method.validate``), as are GIFT-SW's k, metric and scores file.
    """

    model: str = flag("smollm2-135m", "base model: preset (smollm2-135m, tiny-random-llama), folder or hub id")
    data: str = flag("embedded", "training data: 'embedded', a .jsonl file, or a Hugging Face dataset name")
    output: str = flag("runs/default", "output directory of the run")
    method: str = flag("gift-sw", "training method (see `salientft train --help` for the list)")
    lr: float | None = flag(None, "peak learning rate (default: the method's)")
    epochs: float = flag(1.0, "passes over the data (ignored when --max-steps is given)")
    max_steps: int = flag(-1, "optimizer steps (-1: use --epochs)")
    batch_size: int = flag(4, "sequences per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    warmup_ratio: float = flag(0.03, "warm-up steps (a fraction < 1 of the total is a ratio)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0: none)")
    max_length: int = flag(512, "tokens per sequence (longer chats are truncated)")
    packing: bool = flag(False, "pack several chats into each sequence")
    data_limit: int | None = flag(None, "use only the first N training records")
    dtype: str = flag("bf16", "bf16 (frozen weights bf16, trainable fp32, bf16 autocast), fp16 (the same in fp16, with a gradient scaler) or fp32")
    device: str = flag("auto", "where every phase runs (loading, calibration, training, evaluation): auto (CUDA if available, else CPU), cpu, cuda or cuda:N; under torchrun each process uses its LOCAL_RANK GPU")
    gradient_checkpointing: bool = flag(False, "recompute activations in backward to save memory")
    fsdp: str = flag("", "under torchrun/accelerate launch: shard weights, gradients and optimizer state with FSDP2 per decoder layer: full_shard (re-gather in backward) or shard_grad_op (keep gathered until backward); '' for none (DDP). See docs/distributed.md")
    seed: int = flag(0, "random seed (data order, salient columns of metric 'random', noise)")
    save_steps: int = flag(0, "write a resumable checkpoint every N steps (0: none)")
    logging_steps: int = flag(1, "log the loss every N steps")
    merge: bool = flag(False, "also write merged/: the trained model as a plain transformers folder")
    # GIFT-SW
    n_salient: int | None = gift_field("n_salient", "GIFT-SW: ")
    salient_fraction: float | None = gift_field("salient_fraction", "GIFT-SW: ")
    metric: str = gift_field("metric", "GIFT-SW: ")
    scores: str | None = flag(None, "GIFT-SW: precomputed scores file from salientft calibrate")
    noise: str | None = flag(None, "GIFT-SW's noise: weight, output or none (default: weight for gift-sw, none for salient, full, gmt; full/gmt add it to every weight of the target layers, all still training)")
    noise_bits: int = gift_field("noise_bits", "GIFT-SW, and full/gmt with --noise: ")
    fp32_salient: bool = gift_field("fp32_salient", "GIFT-SW: ")
    keep_noise: bool = gift_field("keep_noise", "GIFT-SW, and full/gmt with --noise weight: ")
    calib_samples: int = flag(128, "GIFT-SW: calibration samples for data-dependent metrics")
    target_modules: list[str] | str | None = flag(None, "layers to train (full/gmt: the layers --noise perturbs): 'q_proj,v_proj' or 're:<regex>' (default: all linear layers of the blocks)")
    # PEFT baselines
    lora_r: int = flag(8, "LoRA/DoRA: rank r")
    lora_alpha: float | None = flag(None, "LoRA/DoRA: alpha (default 2r)")
    lora_dropout: float = flag(0.0, "LoRA/DoRA: dropout")
    # GMT
    mask_ratio: float | None = flag(None, "GMT: fraction of gradient entries zeroed before each step (gmt default 0.5)")
    mask_granularity: str = flag("tensor", "GMT: threshold per tensor or global")
    mask_mode: str = flag("paper", "GMT: paper (zero the gradient) or strict (masked entries get no update)")
    # Evaluation before/after (the eval tasks, or "loss" for held-out loss only; "" for none)
    eval_tasks: str = flag("", "evaluate before/after on these tasks ('paper', 'all', names; '' for none)")
    eval_limit: int | None = flag(None, "first N items of each eval task")
    eval_subset: str | None = flag(None, "evaluate this fixed seeded item subset (paper500, smoke20) instead of the "
                                         "first eval_limit items; runs on one subset can be compared item by item")
    eval_before: bool = flag(True, "also evaluate the model before training (off: many runs of one base)")
    report_to: str = flag("none", "experiment trackers for the Trainer's logs: none, tensorboard, wandb, mlflow, ... (comma-separated)")
    trust_remote_code: bool = flag(False, "allow the model's own code from the hub (off by default)")
    quantized: str | None = flag(None, "recover this quantized model (a folder from salientft quantize)")

    # Defaults changed since runs were stored: a stored (or YAML) value equal to the former default
    # counts as the field left at its default (run_config.json files of earlier versions still load
    # and resume). fp32_salient was False ("always on with bf16"); it is GiftConfig's True now.
    FORMER_DEFAULTS: ClassVar[dict] = {"fp32_salient": False}

    def __post_init__(self):
        n = type(self).__name__
        coerce_fields(self)  # every field as its declared type: "false" is False, "2e-4" is 0.0002
        check_choice(n, "dtype", self.dtype, ("bf16", "fp32", "fp16"))
        # the spelling only: whether the device is there is checked where the run starts (train), so a
        # config can be written on a machine without it
        self.device = check_device_spec(self.device, flag=f"{n}.device")
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
            check_choice(n, "noise", self.noise, NOISE_MODES)
        if self.mask_ratio is not None and not 0 <= self.mask_ratio < 1:
            raise ValueError(f"{n}.mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        check_choice(n, "fsdp", self.fsdp, FSDP_MODES)
        check_choice(n, "mask_granularity", self.mask_granularity, GMTConfig.GRANULARITIES)
        check_choice(n, "mask_mode", self.mask_mode, GMTConfig.MODES)
        if self.eval_tasks:
            from .evaluation.tasks import parse_tasks

            parse_tasks(self.eval_tasks)  # unknown names fail now, not after training
        if self.eval_subset is not None:
            from .evaluation.tasks import get_subset

            get_subset(self.eval_subset)
            if self.eval_limit is not None:
                raise ValueError(f"{n}.eval_limit and {n}.eval_subset are exclusive: a subset fixes the items itself")
        if not isinstance(self.report_to, str) or not self.report_to.strip():
            raise ValueError(f"{n}.report_to must name trackers (e.g. 'tensorboard') or be 'none', got {self.report_to!r}")
        if self.data_limit is not None and self.data_limit < 1:
            raise ValueError(f"{n}.data_limit must be positive")
        self._check_bounds()
        if isinstance(self.target_modules, str):
            from .targets import compile_target_regex

            compile_target_regex(self.target_modules)  # a broken regex is refused now, not after the model loads
        self.training_method.validate(self)

    def _check_bounds(self) -> None:
        """The numeric fields the checks above leave open (types are already checked: finite floats)."""
        for name in ("weight_decay", "max_grad_norm"):
            check_range(self, name, min=0, what="must be >= 0")
        check_range(self, "epochs", min=0, min_open=True, what="must be positive")
        check_range(self, "seed", min=0, max=2**32 - 1)
        check_range(self, "noise_bits", min=2, max=16, what="must be an integer in [2, 16]")
        check_range(self, "lora_alpha", min=0, min_open=True, what="must be positive")
        check_range(self, "lora_dropout", min=0, max=1, max_open=True)
        check_range(self, "eval_limit", min=1, what="must be a positive integer")
        from .deps import tracker_names

        tracker_names(self.report_to)  # an unknown tracker: refused now, with the nearest valid name

    @property
    def training_method(self) -> _methods.Method:
        """The registered method this run trains with (``salientft.methods``)."""
        return _methods.get(self.method, quantized=self.quantized is not None)

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else self.training_method.default_lr

    def gift_config(self) -> GiftConfig:
        """The GiftConfig of a GIFT-SW run (method gift-sw or salient)."""
        return self.training_method.gift_config(self)


def __getattr__(name):
    # Deprecated module constants, now answered by the registry.
    if name == "METHODS":
        return tuple(_methods.names(quantized=None))
    if name == "QUANTIZED_METHODS":
        return tuple(_methods.names(quantized=True))
    if name == "DEFAULT_LR":
        lrs: dict[str, float] = {}
        for m in _methods.registered():  # plain methods first: they win a shared name
            lrs.setdefault(m.name, m.default_lr)
        return lrs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
