"""Which quantized model a results file measured, and which code made it.

Benchmarks cache quantized models and quote them across sections and files. Two facts keep those
quotes honest: ``quantized_fingerprint`` names a model by what quantization decided (two files with
the same fingerprint measured the same model; 1 and 2 threads must give the same one), and
``code_version`` names the code that decides it, so a cache keyed on it can never serve a model the
current code would not make.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import torch
from torch import nn

# The modules whose code decides the integers, scales and salient columns of a quantized model:
# the row quantizer and clip search, GPTQ, the driver, packing, the salient-column metrics and the
# calibration statistics they read.
DECIDING_MODULES = ("ops/grid.py", "ops/salient.py", "quant/gptq.py", "quant/model.py", "quant/packing.py",
                    "quant/layer.py", "saliency.py", "calibration.py")


def quantized_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of every quantized layer's name, salient columns, packed integers,
    scales and 16-bit columns, in name order."""
    from .model import quantized_layers

    digest = hashlib.sha256()
    for name, layer in sorted(quantized_layers(model).items()):
        digest.update(name.encode())
        for t in (layer.salient_idx, layer.qweight, layer.scale, layer.salient_weight):
            t = t.detach().contiguous().cpu()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _code_of(path: Path) -> str:
    """The module's syntax tree without docstrings: comments, docstrings and formatting do not
    change what the code computes, so editing them does not invalidate anyone's cache."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def code_version() -> str:
    """SHA-256 (16 hex digits) of ``DECIDING_MODULES``' code and torch's version."""
    pkg = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode())
    for rel in DECIDING_MODULES:
        digest.update(rel.encode())
        digest.update(_code_of(pkg / rel).encode())
    return digest.hexdigest()[:16]
