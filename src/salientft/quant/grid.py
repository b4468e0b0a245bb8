"""The row quantizer of docs/methods.md#row-quantizer now lives in ``salientft.ops.grid``; this module re-exports it."""
from ..ops.grid import GRID_POINTS, GRID_STEP, check_grid_bits, clip_grid, quantize_rows

__all__ = ["GRID_POINTS", "GRID_STEP", "check_grid_bits", "clip_grid", "quantize_rows"]
