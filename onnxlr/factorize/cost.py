"""Cost model: parameters, bytes, MACs, FLOPs and activation bytes per node and in total.

Shapes come from ONNX shape inference (onnxlr.model_io.shapes.infer_shapes), with `--shape NAME:DIMS`
fixing dynamic input dimensions first. A dimension that stays unknown counts as 1, so figures
are then "per unit" of it (per token, per batch item); `unknown_dims` says when that happened.

MACs are counted for MatMul, Gemm, Conv and ConvTranspose (multiply-accumulates of the
product) and for LSTM, GRU and RNN (their input and recurrent weights, every step and direction); FLOPs are 2 x MACs for those and one per output element for every other op (a
deliberately simple estimate for elementwise and normalization ops).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
MAC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", *RECURRENT_OPS)


@dataclasses.dataclass
class NodeCost:
    name: str
    op_type: str
    macs: int
    flops: int
    weight_bytes: int  # constant inputs the node reads (initializers / Constant values)
    input_bytes: int  # activations read
    output_bytes: int  # activations written
    unknown_dims: bool  # some shape was unknown and counted as 1

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dims(shapes: Mapping[str, tuple | None], value: ir.Value | None) -> tuple[list[int], bool] | None:
    """Known dims of a value (unknown ones as 1) and whether any was unknown; None if the rank is unknown."""
    if value is None:
        return None
    shape = shapes.get(value.name or "")
    if shape is None:
        if value.const_value is not None:
            return list(value.const_value.shape.numpy()), False
        return None
    dims = [d if isinstance(d, int) and d >= 0 else 1 for d in shape]
    return dims, any(not (isinstance(d, int) and d >= 0) for d in shape)


def _count(dims: list[int]) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def _bytes(value: ir.Value | None, shapes: Mapping[str, tuple | None]) -> int:
    if value is None or value.type is None or not hasattr(value.type, "dtype"):
        return 0
    dims = _dims(shapes, value)
    if dims is None:
        return 0
    try:
        bitwidth = value.type.dtype.bitwidth
    except TypeError:  # STRING has no fixed width: not counted (onnxlr never rewrites string paths)
        return 0
    return (_count(dims[0]) * bitwidth + 7) // 8


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def node_macs(node: ir.Node, shapes: Mapping[str, tuple | None]) -> tuple[int, bool]:
    """MACs of one node (0 for ops without a product) and whether unknown dims were counted as 1."""
    out = _dims(shapes, node.outputs[0]) if node.outputs else None
    if node.op_type == "MatMul":
        a = _dims(shapes, node.inputs[0])
        if out is None or a is None:
            return 0, True
        return _count(out[0]) * a[0][-1], out[1] or a[1]
    if node.op_type == "Gemm":
        a = _dims(shapes, node.inputs[0])
        if out is None or a is None or len(a[0]) != 2:
            return 0, True
        trans_a = node.attributes.get("transA")
        k = a[0][0] if trans_a is not None and trans_a.value else a[0][1]
        return _count(out[0]) * k, out[1] or a[1]
    if node.op_type == "Conv":
        w = _dims(shapes, node.inputs[1])
        if out is None or w is None:
            return 0, True
        return _count(out[0]) * _count(w[0][1:]), out[1] or w[1]
    if node.op_type == "ConvTranspose":
        x = _dims(shapes, node.inputs[0])
        w = _dims(shapes, node.inputs[1])
        if x is None or w is None:
            return 0, True
        return _count(x[0]) * _count(w[0][1:]), x[1] or w[1]
    if node.op_type in RECURRENT_OPS:
        # X (seq, batch, input) or (batch, seq, input): every step of every direction multiplies its
        # input by W_d^T (gates·hidden x input) and its state by R_d^T (gates·hidden x hidden).
        x = _dims(shapes, node.inputs[0])
        w = _dims(shapes, node.inputs[1]) if len(node.inputs) > 1 else None
        r = _dims(shapes, node.inputs[2]) if len(node.inputs) > 2 else None
        if x is None or w is None or r is None or len(x[0]) != 3 or len(w[0]) != 3 or len(r[0]) != 3:
            return 0, True
        return _count(x[0][:2]) * _count(w[0][:2]) * (w[0][2] + r[0][2]), x[1] or w[1] or r[1]
    return 0, False


def node_cost(node: ir.Node, shapes: Mapping[str, tuple | None]) -> NodeCost:
    macs, unknown = node_macs(node, shapes)
    outputs = sum(_bytes(v, shapes) for v in node.outputs)
    if node.op_type in MAC_OPS:
        flops = 2 * macs
    else:
        elements = [_dims(shapes, v) for v in node.outputs[:1]]
        flops = _count(elements[0][0]) if elements and elements[0] else 0
        unknown = unknown or bool(elements and elements[0] and elements[0][1])
    weights = sum(_bytes(v, shapes) for v in node.inputs if _is_constant(v))
    activations = sum(_bytes(v, shapes) for v in node.inputs if v is not None and not _is_constant(v))
    return NodeCost(name=node.name or "", op_type=node.op_type, macs=macs, flops=flops, weight_bytes=weights,
                    input_bytes=activations, output_bytes=outputs, unknown_dims=unknown)


def model_costs(model: ir.Model, shapes: Mapping[str, tuple | None]) -> list[NodeCost]:
    """One NodeCost per node of the main graph (subgraph bodies are not unrolled), Constants excluded."""
    return [node_cost(node, shapes) for node in model.graph if node.op_type != "Constant"]


def model_totals(model: ir.Model) -> dict[str, int]:
    """Parameters and bytes of every constant tensor in the model (shared tensors counted once)."""
    params = nbytes = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                params += value.const_value.size
                nbytes += value.const_value.nbytes
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                tensor = ir.convenience.get_const_tensor(node.outputs[0])
                if tensor is not None:
                    params += tensor.size
                    nbytes += tensor.nbytes
    return {"params": params, "bytes": nbytes}


def totals(costs: list[NodeCost], model: ir.Model) -> dict[str, Any]:
    constants = model_totals(model)
    return {
        "params": constants["params"],
        "bytes": constants["bytes"],
        "macs": sum(c.macs for c in costs),
        "flops": sum(c.flops for c in costs),
        "activation_bytes": sum(c.output_bytes for c in costs),
        "unknown_dims": any(c.unknown_dims for c in costs),
    }


def file_size(path: str | os.PathLike, external_files: tuple[Path, ...] = ()) -> int:
    """Bytes on disk: the model file plus its external data files."""
    return Path(path).stat().st_size + sum(Path(f).stat().st_size for f in external_files)
