"""Row quantizer shared by the saliency metric, the noise scale and weight quantization."""
from .grid import quantize_rows

__all__ = ["quantize_rows"]
