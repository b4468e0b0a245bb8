"""salientft: fine-tune large language models by training only their salient weights."""
from .models import load_model
from .quant.grid import quantize_rows

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "quantize_rows",
]
