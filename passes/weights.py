"""Find the constant value behind a node input, folding the small chains exporters leave.

Weights reach MatMul/Gemm/Conv as initializers, as `Constant` nodes (PaddlePaddle and others keep
every weight there), or through Identity/Transpose/Cast/Reshape of a constant. We fold those
chains in numpy; the chain's nodes become unused and cleanup removes them.

An initializer that is also listed as a graph input is a weight only when `inputs_as_constants`
says so (Context.inputs_as_constants: IR < 4 models, where every initializer was listed as an
input, or --inputs-as-constants); otherwise callers may override it at run time and it is skipped.
Weights generated at run time from a few constants (ConstantOfShape, EyeLike, Range, Random*)
are skipped too: materializing them would grow the file.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .base import Skip

QUANTIZED_PRODUCERS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}
FOLDABLE = {"Identity", "Transpose", "Cast", "Reshape"}
# Ops that make a tensor from a few numbers (or only from another tensor's shape): a weight they
# generate from constants is small in the file and large once materialized, so it is left alone.
GENERATORS = {"ConstantOfShape", "EyeLike", "Range", "RandomNormal", "RandomUniform", "RandomNormalLike",
              "RandomUniformLike"}
SHAPE_ONLY_GENERATORS = {"EyeLike", "RandomNormalLike", "RandomUniformLike"}  # read their input's shape only
GRAPH_INPUT_REASON = ("weight is a graph input (it can be overridden at run time; --inputs-as-constants "
                      "treats initializers listed as graph inputs as constant weights)")


@dataclasses.dataclass
class ConstantWeight:
    array: np.ndarray | None = None
    dtype: ir.DataType | None = None
    reason: str = ""  # why there is no usable constant, when array is None
    code: str = ""  # the reason's stable code (passes.base.REASON_CODES)
    runtime: bool = False  # True when the value is simply an activation (computed at run time)
    sources: tuple[ir.Value, ...] = ()  # initializers or Constant outputs the weight was folded from

    def skip(self) -> Skip:
        """Why this input is no weight, as the Skip a rule raises."""
        return Skip(self.code, self.reason)


def constant_weight(value: ir.Value | None, depth: int = 0, inputs_as_constants: bool = False) -> ConstantWeight:
    """The constant behind `value`, or why there is none.

    `inputs_as_constants`: an initializer listed as a graph input is a weight (IR < 4 models list every
    initializer there; --inputs-as-constants), not a value callers override at run time."""
    if value is None:
        return ConstantWeight(reason="input is missing", code="missing_input")
    if value.is_graph_input():
        if value.const_value is None:
            return ConstantWeight(reason="weight is a graph input, computed at run time", code="runtime_weight",
                                  runtime=True)
        if not inputs_as_constants:  # an initializer listed as input: callers may override it
            return ConstantWeight(reason=GRAPH_INPUT_REASON, code="graph_input")
    if value.is_graph_output():
        # A constant that is also an output cannot be replaced; a value computed at run time (a KV cache's
        # present key, say) is simply an activation, and reads as one.
        behind = _constant_behind(value, depth, inputs_as_constants)
        if behind.array is None:
            return behind
        return ConstantWeight(reason="weight is also a graph output", code="graph_output")
    return _constant_behind(value, depth, inputs_as_constants)


def _constant_behind(value: ir.Value, depth: int, inputs_as_constants: bool) -> ConstantWeight:
    """constant_weight past the graph input/output checks: the value's own tensor or its producer's."""
    if value.const_value is not None:
        return _from_tensor(value.const_value, (value,))
    producer = value.producer()
    if producer is None:
        return ConstantWeight(reason="weight is computed at run time", code="runtime_weight", runtime=True)
    op = producer.op_type
    if producer.domain not in ("", "ai.onnx"):
        return ConstantWeight(reason=f"weight comes from custom op {producer.domain}::{op}", code="custom_op_weight")
    if op == "Constant":
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None:
            return ConstantWeight(reason="Constant node without a tensor value", code="constant_without_value")
        return _from_tensor(tensor, (value,))
    if op in QUANTIZED_PRODUCERS:
        return ConstantWeight(reason=f"quantized weight ({op}): left as it is", code="quantized_weight")
    if op in FOLDABLE and depth < 16:
        return _fold(producer, depth, inputs_as_constants)
    if op in GENERATORS and _generated_from_constants(producer, depth, inputs_as_constants):
        return ConstantWeight(reason=f"weight is generated at run time by {op} from constants; materializing it "
                                     "would grow the file", code="generated_weight")
    return ConstantWeight(reason=f"weight is computed at run time (by {op})", code="runtime_weight", runtime=True)


def _generated_from_constants(node: ir.Node, depth: int, inputs_as_constants: bool) -> bool:
    """True when the generator's result is fixed: its inputs are constants (or, for the *Like ops, have a static shape)."""
    for value in node.inputs:
        if value is None:
            continue
        if node.op_type in SHAPE_ONLY_GENERATORS and value.shape is not None and value.shape.is_static():
            continue
        if depth >= 16 or constant_weight(value, depth + 1, inputs_as_constants).array is None:
            return False
    return True


def _from_tensor(tensor: ir.TensorProtocol, sources: tuple[ir.Value, ...]) -> ConstantWeight:
    return ConstantWeight(array=tensor.numpy(), dtype=tensor.dtype, sources=sources)


def _fold(node: ir.Node, depth: int, inputs_as_constants: bool) -> ConstantWeight:
    data = constant_weight(node.inputs[0], depth + 1, inputs_as_constants)
    if data.array is None:
        return dataclasses.replace(data, reason=f"{data.reason} (through {node.op_type})")
    array, dtype = data.array, data.dtype
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        array = np.transpose(array, perm.value if perm is not None else None)
    elif node.op_type == "Cast":
        dtype = ir.DataType(node.attributes["to"].value)
        if not dtype.is_floating_point():
            return ConstantWeight(reason=f"weight is cast to {dtype.name}", code="non_float_cast")
        array = array.astype(dtype.numpy())
    elif node.op_type == "Reshape":
        shape = constant_weight(node.inputs[1], depth + 1, inputs_as_constants)
        if shape.array is None:
            return ConstantWeight(reason="weight is reshaped to a shape computed at run time", code="runtime_reshape")
        allow_zero = node.attributes.get("allowzero")
        array = array.reshape(_reshape_target(array.shape, shape.array, bool(allow_zero and allow_zero.value)))
    return ConstantWeight(array=array, dtype=dtype, sources=data.sources)


def _reshape_target(current: tuple[int, ...], requested: np.ndarray, allow_zero: bool) -> tuple[int, ...]:
    """ONNX Reshape semantics: 0 copies the input dimension (unless allowzero), -1 is inferred by numpy."""
    dims = [int(d) for d in requested.reshape(-1)]
    if not allow_zero:
        dims = [current[i] if d == 0 else d for i, d in enumerate(dims)]
    return tuple(dims)


def no_weight_skip(*candidates: ConstantWeight) -> Skip:
    """Why a two-input op has no weight: a specific reason if any input has one, else the generic one."""
    for candidate in candidates:
        if not candidate.runtime and candidate.reason:
            return candidate.skip()
    return Skip("runtime_weight", "no constant weight: both inputs are computed at run time")
