"""The options every benchmark spells the same way.

``--dtype`` takes the CLI's names (``salientft train --dtype fp32|bf16``); ``float32`` and
``bfloat16``, which bench/step.py and bench/scaling.py used to take, are accepted as aliases and
normalised, so an old command line still runs and every results file records one spelling.
"""
from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16"}


def dtype_name(text: str) -> str:
    """``text`` as one of DTYPES' names (an alias normalised); argparse's ``type`` for ``--dtype``."""
    name = ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)} "
                                         f"(aliases: {', '.join(ALIASES)})")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[dtype_name(name)]


def add_dtype_argument(ap: argparse.ArgumentParser, default: str = "fp32", help_extra: str = "") -> None:
    ap.add_argument("--dtype", type=dtype_name, default=default, metavar="{fp32,bf16}",
                    help=f"model dtype (default {default}; float32/bfloat16 accepted as aliases){help_extra}")
