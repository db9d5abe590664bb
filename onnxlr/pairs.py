"""Coupled MLP pairs: two linear layers joined only by an elementwise activation.

    up:   h = X·W1 + b1            (MatMul [+ Add bias], or Gemm with B and C)
          a = f(h)                  (an elementwise region: Relu, Gelu and its Erf/tanh expansions, SiLU, ...)
    down: y = a·W2 [+ b2]           (MatMul or Gemm reading `a` as its activation input)

Every one of the D intermediate neurons is a column of W1 (and an entry of b1), one channel of the
activation region, and a row of W2, and nothing else reads them. Keeping k of the D neurons is then
slicing W1's columns, b1 and W2's rows: both weights shrink and no node is added (unlike a low-rank
factorization, which inserts one). This module only finds such pairs (and says why a linear layer
that starts an activation region is not one); choosing and slicing the neurons is a later stage.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
REGION_OPS = frozenset({
    "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Clip", "Neg", "Abs", "Exp", "Sqrt", "Mul", "Add", "Sub", "Div", "Pow", "Identity", "Cast",
})


@dataclasses.dataclass
class Linear:
    node: ir.Node  # MatMul with the constant weight as input 1 (X·W), or Gemm with the weight as B (transA=0)
    weight: ir.Value  # an initializer or a Constant node's output, read by this node only, 2-D, float
    transposed: bool  # Gemm transB=1: the weight is stored (out, in)
    bias: ir.Value | None  # constant (out,) or (1, out): Gemm's C, or the constant input of the Add right after
    bias_node: ir.Node | None  # that Add (None when the bias is Gemm's C, or there is no bias)
    output: ir.Value  # the value after the bias

    def matrix(self) -> np.ndarray:
        """The weight as (in, out), X·W."""
        array = _const(self.weight).numpy()
        return array.T if self.transposed else array

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else _const(self.bias).numpy().reshape(-1)

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out)."""
        rows, cols = _const(self.weight).shape
        return (cols, rows) if self.transposed else (rows, cols)


@dataclasses.dataclass
class MlpPair:
    up: Linear
    down: Linear
    activation: ir.Value  # the down node's input 0: an elementwise function of up.output
    width: int  # D: up's out == down's in


def find_mlp_pairs(model: ir.Model) -> tuple[list[MlpPair], list[tuple[ir.Node, str]]]:
    """Pairs in graph order; and (node, reason) for up-nodes that start an activation region but are not coupled."""
    pairs: list[MlpPair] = []
    rejected: list[tuple[ir.Node, str]] = []
    for node in model.graph:
        up = _read_linear(node)
        if up is None:
            continue
        region_nodes, region_values = _region(up.output)
        if not region_nodes:
            continue  # no activation (plain low rank, attention projections, residual adds): not a candidate
        result = _pair(up, region_nodes, region_values)
        if isinstance(result, MlpPair):
            pairs.append(result)
        else:
            rejected.append((node, result))
    return pairs, rejected


def _pair(up: Linear, region_nodes: list[ir.Node], region_values: list[ir.Value]) -> MlpPair | str:
    """The pair up starts, or why there is none."""
    problem = _problem(up)
    if problem:
        return problem
    for value in region_values:
        if value.is_graph_output():
            return f"intermediate '{value.name}' is a graph output"
    members = {id(node) for node in region_nodes}
    readers = [(use.node, use.idx, value) for value in region_values for use in value.uses()
               if id(use.node) not in members]
    if not readers:
        return "the activation is not read by a linear layer"
    down_node, idx, activation = next((r for r in readers if r[1] == 0 and _read_linear(r[0])), readers[0])
    if idx != 0 or _read_linear(down_node) is None:
        return f"the activation is read by {down_node.op_type} node '{down_node.name}', not a linear layer's input 0"
    other = next((node for node, _, _ in readers if node is not down_node), None)
    if other is not None or len(readers) > 1:
        other = other or down_node  # the down node reading a second region value
        return f"intermediate is also read by {other.op_type} node '{other.name}'"
    down = _read_linear(down_node)
    problem = _problem(down)
    if problem:
        return f"down {down_node.op_type} node '{down_node.name}': {problem}"
    if up.shape[1] != down.shape[0]:
        return f"widths differ: up has {up.shape[1]} outputs, down {down_node.name!r} {down.shape[0]} inputs"
    if _const(up.weight).dtype != _const(down.weight).dtype:
        return f"weight types differ: {_const(up.weight).dtype} and {_const(down.weight).dtype}"
    return MlpPair(up=up, down=down, activation=activation, width=up.shape[1])


def _read_linear(node: ir.Node) -> Linear | None:
    """node as a linear layer with a constant weight (checked later by _problem), else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None or _const(weight) is None or node.inputs[0] is None:
        return None
    if node.op_type == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return Linear(node, weight, _attr(node, "transB", 0) == 1, bias, None, node.outputs[0])
    bias, bias_node = _bias_add(node.outputs[0])
    return Linear(node, weight, False, bias, bias_node, bias_node.outputs[0] if bias_node else node.outputs[0])


def _bias_add(output: ir.Value) -> tuple[ir.Value | None, ir.Node | None]:
    """The constant non-scalar input of the one Add reading a MatMul's output, and that Add."""
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - uses[0].idx]
    tensor = _const(other) if other is not None else None
    if tensor is None or tensor.size < 2 or len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[0] != 1):
        return None, None
    return other, add


def _problem(linear: Linear) -> str | None:
    """Why this linear layer cannot have its neurons sliced, or None."""
    node = linear.node
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) != 0:
            return "Gemm has transA=1"
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "Gemm has alpha or beta other than 1"
    problem = _sole_constant(linear.weight, node, "weight")
    if problem:
        return problem
    tensor = _const(linear.weight)
    if len(tensor.shape) != 2 or tensor.dtype not in FLOAT_TYPES:
        return f"weight '{linear.weight.name}' is not a 2-D float matrix"
    if linear.bias is None:
        return None
    reader = linear.bias_node or node
    problem = _sole_constant(linear.bias, reader, "bias")
    if problem:
        return problem
    bias = _const(linear.bias)
    if bias.size != linear.shape[1] or len(bias.shape) > 2 or (len(bias.shape) == 2 and bias.shape[0] != 1):
        return f"bias '{linear.bias.name}' is not a constant of shape ({linear.shape[1]},)"
    return None


def _sole_constant(value: ir.Value, reader: ir.Node, what: str) -> str | None:
    if _const(value) is None:
        return f"{what} '{value.name}' is not a constant"
    if value.is_graph_input() or value.is_graph_output():
        return f"{what} '{value.name}' is also a graph input or output"
    if any(use.node is not reader for use in value.uses()):
        return f"{what} '{value.name}' is also read by another node"
    return None


def _region(start: ir.Value) -> tuple[list[ir.Node], list[ir.Value]]:
    """The elementwise nodes fed only by start, by each other and by scalar constants; and their values."""
    nodes: list[ir.Node] = []
    values = [start]
    known = {id(start)}
    grown = True
    while grown:
        grown = False
        for value in list(values):
            for use in value.uses():
                node = use.node
                if id(node) in known or not _joins(node, known):
                    continue
                known.add(id(node))
                nodes.append(node)
                values.extend(node.outputs)
                known.update(id(output) for output in node.outputs)
                grown = True
    return nodes, values


def _joins(node: ir.Node, known: set[int]) -> bool:
    """Whether node is an elementwise op whose inputs are region values (ids in known) or scalar constants."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in REGION_OPS or len(node.outputs) != 1:
        return False
    if node.op_type == "Cast" and ir.DataType(_attr(node, "to", 0)) not in FLOAT_TYPES:
        return False
    for value in node.inputs:
        if value is None or id(value) in known:
            continue
        tensor = _const(value)
        if tensor is None or tensor.size != 1:
            return False
    return True


def _const(value: ir.Value) -> ir.TensorProtocol | None:
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def _attr(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value
