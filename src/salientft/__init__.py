"""salientft: fine-tune large language models by training only their salient weights."""
from .gift import (
    GiftConfig,
    SalientLinear,
    apply_gift,
    load_adapter,
    merge_gift,
    save_adapter,
    trainable_parameters,
    unmerge_gift,
)
from .data.chat import ChatCollator, build_dataset, calibration_batches_from_dataset, tokenize_conversations
from .data.instruct import heldout_texts, load_conversations
from .models import load_model, open_blockwise
from .devices import describe_device, resolve_device
from .ops.grid import quantize_rows
from .quant.layer import QuantizedSalientLinear
from .quant.model import QuantizeConfig, load_quantized, prepare_gift_recovery, quantize, save_quantized
from .quant.ste import STELinear, apply_lora_quantized, apply_ste, ste_to_quantized
from .calibration import (
    ActivationStats,
    calibration_batches,
    collect_activation_stats,
    load_stats,
    save_stats,
    sequential_activation_stats,
)
from .saliency import METRICS, load_scores, plot_scores, saliency_scores, save_scores, select_salient
from .pipelines import calibrate, open_model, quantize_pretrained
from . import methods
from . import peft
from .config import TrainConfig
from .methods import (DoRAMethodConfig, FullMethodConfig, GiftSWMethodConfig, GMTMethodConfig, LoRAMethodConfig,
                      MethodConfig, SalientMethodConfig)
from .export import export_compressed_tensors, export_lora, export_merged  # (salientft.export stays the module)

from .evaluation import compare_runs, evaluate, load_for_eval, perplexity
from .gmt import GMTConfig, GradientMask, build_gradient_mask

peft.install_import_hook()  # GIFT-SW joins PEFT's mappings whenever PEFT is imported

__version__ = "0.1.0"

__all__ = [
    "methods",
    "TrainConfig",
    "MethodConfig",
    "GiftSWMethodConfig",
    "SalientMethodConfig",
    "LoRAMethodConfig",
    "DoRAMethodConfig",
    "FullMethodConfig",
    "GMTMethodConfig",
    "quantize_pretrained",
    "export_lora",
    "export_merged",
    "export_compressed_tensors",
    "GiftConfig",
    "SalientLinear",
    "apply_gift",
    "load_adapter",
    "merge_gift",
    "save_adapter",
    "trainable_parameters",
    "unmerge_gift",
    "ChatCollator",
    "build_dataset",
    "calibration_batches_from_dataset",
    "heldout_texts",
    "load_conversations",
    "tokenize_conversations",
    "load_model",
    "open_blockwise",
    "open_model",
    "resolve_device",
    "describe_device",
    "quantize_rows",
    "QuantizedSalientLinear",
    "QuantizeConfig",
    "prepare_gift_recovery",
    "load_quantized",
    "quantize",
    "save_quantized",
    "STELinear",
    "apply_lora_quantized",
    "apply_ste",
    "ste_to_quantized",
    "ActivationStats",
    "calibrate",
    "calibration_batches",
    "collect_activation_stats",
    "sequential_activation_stats",
    "load_stats",
    "save_stats",
    "METRICS",
    "load_scores",
    "plot_scores",
    "saliency_scores",
    "save_scores",
    "select_salient",
    "evaluate",
    "perplexity",
    "compare_runs",
    "load_for_eval",
    "GMTConfig",
    "GradientMask",
    "build_gradient_mask",
]
