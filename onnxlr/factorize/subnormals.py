"""No subnormal float is ever written: every tensor onnxlr adds to a model has its subnormals flushed to zero.

x86 CPUs run arithmetic on subnormal floats (|x| < 1.18e-38 in float32) many times slower, and an SVD's tail
often holds some (the singular vectors of a weight's dead rows or channels): one such factor conv of a real OCR
model ran 16x slower than the layer it replaced, and onnxruntime's `session.set_denormal_as_zero` did not help.
Flushing them changes each value by less than 1.2e-38, so the rewrite stays exact at full rank.

float32, float64 and bfloat16 (which shares float32's exponent range and is widened to float32 by CPU kernels)
are flushed at float32's smallest normal, float64 at its own. float16 is left alone: its subnormals (< 6.1e-5)
carry real precision, and CPU kernels widen float16 to float32, where they are normal numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

META_KEY = "onnxlr.subnormals_flushed"  # value.meta: how many values add_initializer flushed in that tensor
FLUSHED = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


def _tiny(dtype: ir.DataType) -> float:
    return float(np.finfo(np.float64).tiny) if dtype == ir.DataType.DOUBLE else float(np.finfo(np.float32).tiny)


def subnormal_mask(array: np.ndarray, dtype: ir.DataType) -> np.ndarray | None:
    """Where `array` (stored as `dtype`) holds subnormal values; None for a dtype that is not flushed."""
    if dtype not in FLUSHED:
        return None
    wide = array if dtype == ir.DataType.DOUBLE else array.astype(np.float32, copy=False)
    magnitude = np.abs(wide)
    return (magnitude < _tiny(dtype)) & (magnitude > 0)


def flush(array: np.ndarray, dtype: ir.DataType) -> int:
    """Set `array`'s subnormal values to zero, in place; returns how many there were."""
    mask = subnormal_mask(array, dtype)
    if mask is None:
        return 0
    count = int(np.count_nonzero(mask))
    if count:
        array[mask] = 0
    return count


def count(array: np.ndarray, dtype: ir.DataType) -> int:
    mask = subnormal_mask(array, dtype)
    return 0 if mask is None else int(np.count_nonzero(mask))


def flushed_in(values: Iterable[ir.Value]) -> int:
    """What add_initializer flushed in these values' tensors (the report's `subnormals_flushed`)."""
    return sum(int(value.meta.get(META_KEY, 0)) for value in values)


def model_flushed(model: ir.Model) -> int:
    """Every value flushed in the initializers onnxlr wrote that `model` still holds."""
    return sum(flushed_in(graph.initializers.values()) for graph in model.graphs())
