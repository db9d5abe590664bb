"""Low-rank correction of 4-bit quantization error (LQER / QERA, on ONNX): W is written as Q(W) + A·B.

onnxruntime's MatMulNBits quantizer stores each MatMul weight W (K x N) in 4 bits. What it stores is read back
exactly as its kernel computes it: a one-node model of the quantized node, fed the K x K identity, outputs the
dequantized weight Q(W) (nothing here re-implements the stored format). The error E = W - Q(W) is factorized by
the same activation-whitened SVD the low-rank rewrite uses (lowrank.whitened_svd on the Gram of the node's
calibration inputs): the rank-r pair A·B minimizes ||X·(E - A·B)|| on the calibration activations, which is what
makes a small rank pay (a plain SVD of E spends it on directions the inputs never excite).

The correction is a thin path beside the quantized node: y = MatMulNBits(x) + (x·A)·B, with A and B stored in
float16 (a Cast to float32 that onnxruntime folds when the session loads), int8 (per column, symmetric, quantized
by onnxruntime's quant_utils.quantize_data and read through DequantizeLinear) or float32. At rank 0 nothing is
added; at full rank with float32 factors the pair restores W exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import numpy as np
import onnx_ir as ir

from onnxlr.factorize import lowrank
from onnxlr.model_io.shapes import default_opset
from onnxlr.passes import NameGenerator
from onnxlr.passes.base import make_node

logger = logging.getLogger(__name__)

IDENTITY_ROWS = 1024  # rows of the identity fed at once to read a quantized weight back
FACTOR_DTYPES = {"float16": ir.DataType.FLOAT16, "int8": ir.DataType.INT8, "float32": ir.DataType.FLOAT}


@dataclasses.dataclass(frozen=True)
class Corrected:
    """One quantized MatMul's correction: its rank, the bytes its factors add, and the share of the whitened
    quantization error the pair removes (1 - residual / error, on the calibration activations)."""

    name: str
    rank: int
    bytes_added: int
    error_removed: float


def correct(quantized: ir.Model, weights: Mapping[str, np.ndarray], grams: Mapping[str, np.ndarray], rank: int,
            factor_dtype: str = "float16", output_error: Callable[[str, np.ndarray], float] | None = None
            ) -> list[Corrected]:
    """Add a rank-`rank` correction beside every MatMulNBits node of `quantized`'s main graph, in place.

    `weights`: the float weight each quantized MatMul had, by its output name; `grams`: the Gram of its input on
    the calibration data, by the same name. A node missing either keeps its quantized weight alone.

    `output_error(name, dequantized weight)`: the model's output error with that one layer's weight as quantized
    (measured). With it, the factor bytes of rank `rank` in every layer are shared out instead (`allocate`): each
    direction is worth its share of the layer's whitened error times that layer's measured output error."""
    if rank <= 0:
        return []
    dtype = FACTOR_DTYPES[factor_dtype]
    if dtype == ir.DataType.INT8 and default_opset(quantized) < 13:
        logger.warning("int8 correction factors need opset 13 (DequantizeLinear per column): stored as float16")
        dtype = ir.DataType.FLOAT16
    fits = []  # (node, its whitened error's SVD, what one direction of it is worth)
    widths: list[int] = []
    for node in list(quantized.graph):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        key = cast(str, node.outputs[0].name)
        weight, gram = weights.get(key), grams.get(key)
        if weight is None or gram is None or weight.ndim != 2:
            continue
        stored = dequantized(node)
        error = weight.astype(np.float64) - stored
        decomposition = lowrank.whitened_svd(error[None], gram, side="rows",
                                             rank=None if output_error else min(rank, *error.shape))
        worth = None
        if output_error is not None:
            energy = decomposition.s[0] ** 2
            worth = energy / max(float(energy.sum()), 1e-30) * output_error(key, stored.astype(weight.dtype))
        fits.append((node, decomposition, worth))
        widths.append(sum(error.shape))  # K + N: the factors' parameters per rank
    if output_error is None:
        ranks = [min(rank, d.full_rank) for _, d, _ in fits]
    else:
        budget = sum(min(rank, d.full_rank) * width for (_, d, _), width in zip(fits, widths))
        ranks = allocate([cast(np.ndarray, worth) for _, _, worth in fits], widths, budget)
    names = NameGenerator(quantized)
    done = []
    for (node, decomposition, _), kept in zip(fits, ranks):
        if kept == 0:
            continue
        a, b = decomposition.factors(kept)
        added = add_correction(quantized.graph, node, a[0], b[0], dtype, names)
        done.append(Corrected(name=node.name or cast(str, node.outputs[0].name), rank=kept, bytes_added=added,
                              error_removed=round(float(decomposition.retained_energy(kept)), 6)))
    logger.info("corrected %d quantized MatMuls (rank %d%s)", len(done), rank,
                ", shared out by measured output error" if output_error else "")
    return done


def allocate(worth: Sequence[np.ndarray], widths: Sequence[int], budget: int) -> list[int]:
    """Ranks per layer: the directions (each layer's in order: its worth falls along the spectrum) worth the most
    per parameter, until `budget` parameters (`widths`: parameters per rank of each layer) are spent."""
    order = sorted(((value / width, layer, index) for layer, (values, width) in enumerate(zip(worth, widths))
                    for index, value in enumerate(values) if width), reverse=True)
    ranks, spent = [0] * len(worth), 0
    for _, layer, index in order:
        if index == ranks[layer] and spent + widths[layer] <= budget:  # the layer's next direction, if it fits
            ranks[layer] += 1
            spent += widths[layer]
    return ranks


STORED_OPS = ("MatMulNBits", "GatherBlockQuantized")  # onnxruntime's block-quantized weights, read back here


def dequantized(node: ir.Node) -> np.ndarray:
    """The weight a MatMulNBits node computes with (K x N), or the table a GatherBlockQuantized node gathers from
    (rows x columns), float64: the node alone, run by onnxruntime on the identity (MatMulNBits) or on every row index
    (its constant inputs as they are stored)."""
    import onnx

    from onnxlr.verification.runtime import make_session

    table = node.op_type == "GatherBlockQuantized"
    variable = 1 if table else 0  # the input fed: the indices, or the activation
    initializers, names = [], []
    for index, value in enumerate(node.inputs):
        if index == variable or value is None:
            names.append("x" if index == variable else "")
            continue
        tensor = ir.convenience.get_const_tensor(value)
        assert tensor is not None, f"{node.op_type} input {index} is not a constant"
        names.append(f"c{index}")
        initializers.append(onnx.numpy_helper.from_array(tensor.numpy(), f"c{index}"))
    while names and not names[-1]:
        names.pop()
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    if table:
        data = ir.convenience.get_const_tensor(cast(ir.Value, node.inputs[0]))
        assert data is not None, "GatherBlockQuantized data is not a constant"
        rows = cast(int, data.shape[0])  # a stored table has a fixed shape
        fed = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT64, ["m"])
    else:
        rows = int(node.attributes["K"].value)
        fed = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["m", rows])
    proto = onnx.helper.make_node(node.op_type, names, ["y"], domain="com.microsoft", **attributes)
    graph = onnx.helper.make_graph([proto], "dequantize", [fed], [onnx.helper.make_tensor_value_info("y", 1, None)],
                                   initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = make_session(model.SerializeToString(), "cpu")
    parts = []
    for start in range(0, rows, IDENTITY_ROWS):  # the identity a slice at a time: a 11008-wide one would take 480 MB
        count = min(IDENTITY_ROWS, rows - start)
        fed_rows = (np.arange(start, start + count, dtype=np.int64) if table
                    else np.eye(count, rows, start, dtype=np.float32))
        parts.append(np.asarray(session.run(None, {"x": fed_rows})[0], dtype=np.float64))
    return np.concatenate(parts)


def as_stored(factor: np.ndarray, dtype: str) -> np.ndarray:
    """A correction factor as the model computes with it once stored as `dtype` (float64)."""
    if dtype == "int8":
        quantized, scales, _ = _int8_columns(factor)
        return quantized.astype(np.float64) * scales.astype(np.float64)
    return np.asarray(factor, dtype=FACTOR_DTYPES[dtype].numpy()).astype(np.float64)


def factor_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """The bytes a rows x columns factor takes stored as `dtype` (int8: a float scale and an int8 zero per column)."""
    rows, columns = shape
    if dtype == "int8":
        return rows * columns + 5 * columns
    return int(rows * columns * FACTOR_DTYPES[dtype].itemsize)


def add_correction(graph: ir.Graph, node: ir.Node, a: np.ndarray, b: np.ndarray, dtype: ir.DataType,
                    names: NameGenerator) -> int:
    """y = node(x) + (x·A)·B in place of the node's output (its name and readers move to the Add); returns the
    bytes the factors take."""
    from onnxlr.factorize.rewrite import add_initializer

    x, output = node.inputs[0], node.outputs[0]
    assert x is not None and output.name is not None  # a MatMulNBits reads its activation; a loaded model names it
    base = node.name or output.name
    new_nodes, factors, stored_bytes = [], [], 0
    for label, array in (("a", a), ("b", b)):
        name = names(f"{base}_qc_{label}")
        if dtype == ir.DataType.INT8:
            quantized, scales, zeros = _int8_columns(array)
            inputs = [add_initializer(graph, name, quantized, dtype),
                      add_initializer(graph, names(f"{name}_scale"), scales, ir.DataType.FLOAT),
                      add_initializer(graph, names(f"{name}_zero"), zeros, dtype)]
            widen = make_node("DequantizeLinear", inputs, names(f"{name}_f32"), names(f"{name}_f32"), {"axis": 1})
            stored_bytes += quantized.size + 5 * scales.size
        else:
            stored = add_initializer(graph, name, array, dtype)
            stored_bytes += int(array.size * dtype.itemsize)
            if dtype == ir.DataType.FLOAT:
                factors.append(stored)
                continue
            # stored small, computed in float32 (onnxruntime folds the Cast when the session loads)
            widen = make_node("Cast", [stored], names(f"{name}_f32"), names(f"{name}_f32"), {"to": ir.DataType.FLOAT})
        new_nodes.append(widen)
        factors.append(widen.outputs[0])
    first = make_node("MatMul", [x, factors[0]], names(f"{base}_qc_xa"), names(f"{base}_qc_xa"))
    second = make_node("MatMul", [first.outputs[0], factors[1]], names(f"{base}_qc_xab"), names(f"{base}_qc_xab"))
    readers = list(output.uses())
    name = output.name
    output.name = names(f"{name}_q")
    add = make_node("Add", [output, second.outputs[0]], names(f"{base}_qc_add"), name)
    add.outputs[0].shape, add.outputs[0].type = output.shape, output.type
    for reader, index in readers:
        reader.replace_input_with(index, add.outputs[0])
    for position, value in enumerate(graph.outputs):
        if value is output:
            graph.outputs[position] = add.outputs[0]
    graph.insert_after(node, [*new_nodes, first, second, add])
    return stored_bytes


def _int8_columns(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 per column (onnxruntime's quantize_data on each): the values, scales and zero points."""
    import onnx
    from onnxruntime.quantization.quant_utils import quantize_data

    columns = [quantize_data(np.ascontiguousarray(array[:, j], dtype=np.float32), onnx.TensorProto.INT8, True)
               for j in range(array.shape[1])]
    quantized = np.stack([np.asarray(q, dtype=np.int8) for _, _, q in columns], axis=1)
    scales = np.array([float(s) for _, s, _ in columns], dtype=np.float32)
    return quantized, scales, np.zeros(len(columns), dtype=np.int8)
