"""Weight quantization with salient columns kept in 16 bits: packing, GPTQ/RTN, the quantized
layer, the model driver and its recovery baselines. The row quantizer is ``salientft.ops.grid``."""
from ..ops.grid import quantize_rows

__all__ = ["quantize_rows"]
