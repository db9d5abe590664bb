"""Coupled pairs: up-projections joined to a down layer only by an elementwise activation.

    up:   h = X·W1 + b1            (MatMul [+ Add bias], or Gemm with B and C)
          a = f(h)                  (an elementwise region: Relu, Gelu and its Erf/tanh expansions, SiLU, ...)
    down: y = a·W2 [+ b2]           (MatMul or Gemm reading `a` as its activation input)

A gated MLP (LLaMA's SwiGLU, GeGLU) has two up-projections of the same X joined by a Mul inside the
region: a = f(X·Wg + bg) * (X·Wu + bu), either operand order. Its MlpPair's `gate` is the
projection that starts the activation region (the first in graph order when both have one), and
`up` the other one (the "value" projection); a plain pair has gate=None.

Every one of the D intermediate neurons is a column of each up weight (and an entry of each up
bias), one channel of the activation region, and a row of W2, and nothing else reads them. Keeping
k of the D neurons is then slicing those columns, entries and rows: all weights shrink and no node
is added (unlike a low-rank factorization, which inserts one). Conv channel pairs (onnxlr.coupled.conv_pairs)
are the same with output channels for columns and (kh·kw)-row blocks of the down matrix for rows.

CoupledPair is the slicing API shared by every kind (MlpPair here, ConvPair there): the down
layer's X·W matrix, the parameters at k neurons, and the constant inputs to replace when keeping k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from onnxlr.coupled import joint

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
REGION_OPS = frozenset({
    "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Clip", "Neg", "Abs", "Exp", "Sqrt", "Mul", "Add", "Sub", "Div", "Pow", "Identity", "Cast",
})

Slice = tuple[ir.Node, ir.Value, np.ndarray]  # (the node reading it, the constant input to replace, its new array)


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
        array = _tensor(self.weight).numpy()
        return array.T if self.transposed else array

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else _tensor(self.bias).numpy().reshape(-1)

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out)."""
        rows, cols = _dims(_tensor(self.weight))
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def bias_reader(self) -> ir.Node:
        return self.bias_node or self.node

    @property
    def params_per_out(self) -> int:
        """Parameters of one output (neuron): its weight column and bias entry."""
        return self.shape[0] + (self.bias is not None)

    def stored(self, matrix: np.ndarray) -> np.ndarray:
        """An (in, out) X·W matrix in this weight's stored layout and dtype."""
        return _cast(self.weight, matrix.T if self.transposed else matrix)

    def out_slices(self, kept: np.ndarray) -> list[Slice]:
        """The weight's columns and the bias's entries at the kept outputs."""
        slices = [(self.node, self.weight, self.stored(self.matrix()[:, kept]))]
        if self.bias is not None:
            bias = self.bias_array()
            assert bias is not None  # there is a bias input
            slices.append((self.bias_reader, self.bias, _like(self.bias, bias[kept])))
        return slices


class CoupledPair:
    """The slicing API of a pair (MlpPair, conv_pairs.ConvPair). Subclasses have `down` (with matrix(),
    bias_array(), shape, stored(), bias, bias_reader), `activation` (down's input 0), `width` (D),
    `block` (rows of the down matrix per neuron) and `up_layers()`."""

    down: Any
    activation: ir.Value
    width: int
    norm: Any = None  # a BatchNormalization between the up layer and the activation (conv pairs)

    @property
    def block(self) -> int:
        """Rows of the down matrix per neuron (a class attribute or a property of each kind)."""
        raise NotImplementedError

    def up_layers(self) -> list[Any]:
        raise NotImplementedError

    def _channel_layers(self) -> list[Any]:
        """Everything whose outputs are the neurons (conv pairs add a BatchNormalization)."""
        return self.up_layers()

    def down_matrix(self) -> np.ndarray:
        """(D·block, d_out): the down weight as X·W."""
        return self.down.matrix()

    def down_bias(self) -> np.ndarray | None:
        return self.down.bias_array()

    @property
    def params_per_neuron(self) -> int:
        return sum(layer.params_per_out for layer in self._channel_layers()) + self.block * self.down.shape[1]

    @property
    def fixed_params(self) -> int:
        """The down bias: it stays whatever k is."""
        return 0 if self.down.bias is None else self.down.shape[1]

    @property
    def original_params(self) -> int:
        return self.weight_params(self.width)

    def weight_params(self, keep: int) -> int:
        """Weight and bias parameters of all the pair's layers (BatchNormalization's four too) at `keep` neurons."""
        return keep * self.params_per_neuron + self.fixed_params

    def rows(self, kept: Sequence[int] | np.ndarray) -> np.ndarray:
        """The down matrix's rows of the kept neurons (neuron j owns rows j·block .. j·block + block - 1)."""
        indices = np.asarray(kept, dtype=np.int64)
        return (indices[:, None] * self.block + np.arange(self.block)).reshape(-1)

    def slices(self, kept: Sequence[int] | np.ndarray, down_matrix: np.ndarray, down_bias: np.ndarray | None = None
               ) -> list[Slice]:
        """Every constant input to replace to keep `kept` (sorted neuron indices), with the down weight
        rebuilt from `down_matrix` ((k·block, d_out), X·W) and the down bias from `down_bias` when given."""
        indices = np.asarray(kept, dtype=np.int64)
        if np.shape(down_matrix)[0] != len(indices) * self.block:
            raise ValueError(f"down_matrix has {np.shape(down_matrix)[0]} rows, {len(indices)} neurons need "
                             f"{len(indices) * self.block}")
        slices = [s for layer in self._channel_layers() for s in layer.out_slices(indices)]
        slices.append((self.down.node, self.down.weight, self.down.stored(np.asarray(down_matrix))))
        if down_bias is not None:
            if self.down.bias is None:
                raise ValueError("the down layer has no bias to replace")
            slices.append((self.down.bias_reader, self.down.bias, _like(self.down.bias, np.asarray(down_bias))))
        return slices

    def padded_down(self, kept: Sequence[int] | np.ndarray, down_matrix: np.ndarray) -> np.ndarray:
        """The down weight in its stored shape: `down_matrix`'s rows at the kept neurons, zeros elsewhere
        (in place of the original weight it computes what the sliced pair computes)."""
        full = np.zeros((self.width * self.block, self.down.shape[1]))
        full[self.rows(kept)] = down_matrix
        return self.down.stored(full)

    # The fit API every pair kind shares (onnxlr.coupled.heads.HeadPair too): onnxlr.coupled.plans calls only these.

    @property
    def weights_per_neuron(self) -> int:
        """Weight parameters one kept neuron costs (biases left out)."""
        return sum(layer.shape[0] for layer in self.up_layers()) + self.block * self.down.shape[1]

    def role_params(self, index: int, keep: int) -> tuple[int, int]:
        """(before, after) parameters of up layer `index`, or of the down layer (index len(up_layers())); an
        up conv's row also counts its BatchNormalization."""
        if index == len(self.up_layers()):
            per_neuron = self.block * self.down.shape[1]
            return self.width * per_neuron + self.fixed_params, keep * per_neuron + self.fixed_params
        per_neuron = self.up_layers()[index].params_per_out + (self.norm.params_per_out if self.norm else 0)
        return self.width * per_neuron, keep * per_neuron

    def eliminate(self, correlation: np.ndarray) -> joint.Elimination:
        return joint.eliminate(self.down_matrix(), self.down_bias(), correlation, block=self.block)

    def fit_at(self, correlation: np.ndarray, keep: int) -> joint.JointFit:
        return joint.select_and_refit(self.down_matrix(), self.down_bias(), correlation, keep, block=self.block)

    def effective_down(self, fit: joint.JointFit) -> tuple[np.ndarray, np.ndarray | None]:
        """(D·block, d_out) M and bias with a·M + bias the fitted pair's output for the original activation a."""
        full = np.zeros((self.width * self.block, self.down.shape[1]))
        full[self.rows(fit.kept)] = fit.down_matrix
        return full, fit.down_bias

    def fit_feeds(self, fit: joint.JointFit) -> list[tuple[ir.Value, np.ndarray]]:
        """The fit at the original shapes: the padded down weight and the refitted down bias (the up
        layers' kept outputs are unchanged, and the dropped ones meet zero rows)."""
        feeds = [(self.down.weight, self.padded_down(fit.kept, fit.down_matrix))]
        if self.down.bias is not None and fit.down_bias is not None:
            feeds.append((self.down.bias, _like(self.down.bias, fit.down_bias)))
        return feeds

    def fit_slices(self, fit: joint.JointFit) -> list[Slice]:
        return self.slices(fit.kept, fit.down_matrix, fit.down_bias)

    def fed_biases(self) -> list[tuple[ir.Node, ir.Value]]:
        """The biases a fit changes (the weights are their groups' feeds)."""
        return [] if self.down.bias is None else [(self.down.bias_reader, self.down.bias)]

    def inner_values(self) -> list[ir.Value]:
        """The values from the up layers' outputs to the activation: their neuron axis shrinks to k."""
        pending = [layer.node.outputs[0] for layer in self.up_layers()]
        found: dict[int, ir.Value] = {}
        while pending:
            value = pending.pop()
            if id(value) in found:
                continue
            found[id(value)] = value
            if value is not self.activation:
                pending.extend(out for node in value.consumers() if node is not self.down.node for out in node.outputs)
        return list(found.values())


@dataclasses.dataclass
class MlpPair(CoupledPair):
    up: Linear  # a gated pair's value projection
    down: Linear
    activation: ir.Value  # the down node's input 0: an elementwise function of up.output (and gate.output)
    width: int  # D: up's out == down's in
    gate: Linear | None = None  # a gated pair's projection through the activation; None for a plain pair

    block = 1

    @property
    def kind(self) -> str:
        return "mlp" if self.gate is None else "gated"

    def up_layers(self) -> list[Linear]:
        return [self.up] if self.gate is None else [self.gate, self.up]


def find_mlp_pairs(model: ir.Model) -> tuple[list[MlpPair], list[tuple[ir.Node, str]]]:
    """Pairs in graph order; and (node, reason) for up-nodes that start an activation region but are not coupled.

    A gated pair is found from its gate (the projection starting a region); its value projection,
    without a region of its own, is not a candidate by itself.
    """
    linears = {id(layer.output): layer for node in model.graph if (layer := _read_linear(node)) is not None}
    pairs: list[MlpPair] = []
    rejected: list[tuple[ir.Node, str]] = []
    taken: set[int] = set()  # the nodes of found pairs (a gate found second is not a candidate again)
    for node in model.graph:
        up = _read_linear(node)
        if up is None or id(node) in taken:
            continue
        region_nodes, region_values = _region([up.output])
        if not region_nodes:
            continue  # no activation (plain low rank, attention projections, residual adds): not a candidate
        result = _pair(up, _gate_partner(region_nodes, region_values, linears))
        if isinstance(result, MlpPair):
            pairs.append(result)
            taken.update(id(layer.node) for layer in result.up_layers())
        else:
            rejected.append((node, result))
    return pairs, rejected


def _pair(first: Linear, partner: Linear | None) -> MlpPair | str:
    """The pair `first` starts (gated with `partner` when there is one), or why there is none."""
    problem = _problem(first)
    if problem:
        return problem
    ups = [first] if partner is None else [first, partner]
    if partner is not None:
        problem = _problem(partner)
        if problem:
            return f"up {partner.node.op_type} node '{partner.node.name}': {problem}"
        if partner.node.inputs[0] is not first.node.inputs[0]:
            return f"gated projections '{first.node.name}' and '{partner.node.name}' read different inputs"
    found = _down_reader(*_region([layer.output for layer in ups]), _read_linear, "a linear layer")
    if isinstance(found, str):
        return found
    down, activation = found
    problem = _problem(down)
    if problem:
        return f"down {down.node.op_type} node '{down.node.name}': {problem}"
    for layer in ups:
        if layer.shape[1] != down.shape[0]:
            return f"widths differ: up has {layer.shape[1]} outputs, down {down.node.name!r} {down.shape[0]} inputs"
        if _tensor(layer.weight).dtype != _tensor(down.weight).dtype:
            return f"weight types differ: {_tensor(layer.weight).dtype} and {_tensor(down.weight).dtype}"
    return MlpPair(up=partner or first, down=down, activation=activation, width=down.shape[0],
                   gate=first if partner else None)


def _down_reader(region_nodes: list[ir.Node], region_values: list[ir.Value], read: Callable[[ir.Node], Any],
                 what: str) -> tuple[Any, ir.Value] | str:
    """The one layer (`read` of a node) reading the region, at its input 0, and the value it reads; or why not."""
    for value in region_values:
        if value.is_graph_output():
            return f"intermediate '{value.name}' is a graph output"
    members = {id(node) for node in region_nodes}
    readers = [(use.node, use.idx, value) for value in region_values for use in value.uses()
               if id(use.node) not in members]
    if not readers:
        return f"the activation is not read by {what}"
    down_node, idx, activation = next((r for r in readers if r[1] == 0 and read(r[0])), readers[0])
    if idx != 0 or read(down_node) is None:
        return f"the activation is read by {down_node.op_type} node '{down_node.name}', not {what}'s input 0"
    other = next((node for node, _, _ in readers if node is not down_node), None)
    if other is not None or len(readers) > 1:
        other = other or down_node  # the down node reading a second region value
        return f"intermediate is also read by {other.op_type} node '{other.name}'"
    return read(down_node), activation


def _gate_partner(region_nodes: list[ir.Node], region_values: list[ir.Value], linears: dict[int, Linear]
                  ) -> Linear | None:
    """The linear layer whose output (through elementwise ops of its own) a Mul reading the region multiplies."""
    members, known = {id(node) for node in region_nodes}, {id(value) for value in region_values}
    for value in region_values:
        for use in value.uses():
            node = use.node
            if id(node) in members or node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or \
                    len(node.inputs) != 2 or node.inputs[1 - use.idx] is None:
                continue
            other = node.inputs[1 - use.idx]
            assert other is not None  # checked above
            partner = None if id(other) in known else _projection(other, linears)
            if partner is not None:
                return partner
    return None


def _projection(value: ir.Value, linears: dict[int, Linear]) -> Linear | None:
    """The one linear layer `value` is an elementwise function of (with scalar constants), or None."""
    sources: set[int] = set()
    pending, seen = [value], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if id(current) in linears:
            sources.add(id(current))
            continue
        producer = current.producer()
        if producer is None or not _elementwise(producer):
            return None
        pending.extend(v for v in producer.inputs if v is not None and not _scalar(v))
    return linears[sources.pop()] if len(sources) == 1 else None


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
    tensor = _tensor(linear.weight)
    if len(tensor.shape) != 2 or tensor.dtype not in FLOAT_TYPES:
        return f"weight '{linear.weight.name}' is not a 2-D float matrix"
    if linear.bias is None:
        return None
    return _bias_problem(linear.bias, linear.bias_reader, linear.shape[1])


def _bias_problem(bias: ir.Value, reader: ir.Node, size: int) -> str | None:
    """Why `bias` is not a constant (size,) or (1, size) read by `reader` only, or None."""
    problem = _sole_constant(bias, reader, "bias")
    if problem:
        return problem
    tensor = _tensor(bias)
    if tensor.size != size or len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[0] != 1):
        return f"bias '{bias.name}' is not a constant of shape ({size},)"
    return None


def _sole_constant(value: ir.Value, reader: ir.Node, what: str) -> str | None:
    if _const(value) is None:
        return f"{what} '{value.name}' is not a constant"
    if value.is_graph_input() or value.is_graph_output():
        return f"{what} '{value.name}' is also a graph input or output"
    if any(use.node is not reader for use in value.uses()):
        return f"{what} '{value.name}' is also read by another node"
    return None


def _region(starts: Sequence[ir.Value], joins: Callable[[ir.Node, set[int]], bool] | None = None
            ) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes fed only by the starts, by each other and by scalar constants that `joins` (default:
    elementwise ops) accepts; and their values, the starts first."""
    joins = joins or _joins
    nodes: list[ir.Node] = []
    values = list(starts)
    known = {id(start) for start in starts}
    grown = True
    while grown:
        grown = False
        for value in list(values):
            for use in value.uses():
                node = use.node
                if id(node) in known or not joins(node, known):
                    continue
                known.add(id(node))
                nodes.append(node)
                values.extend(node.outputs)
                known.update(id(output) for output in node.outputs)
                grown = True
    return nodes, values


def _joins(node: ir.Node, known: set[int]) -> bool:
    """Whether node is an elementwise op whose inputs are region values (ids in known) or scalar constants."""
    return _elementwise(node) and all(value is None or id(value) in known or _scalar(value) for value in node.inputs)


def _elementwise(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in REGION_OPS or len(node.outputs) != 1:
        return False
    return node.op_type != "Cast" or ir.DataType(_attr(node, "to", 0)) in FLOAT_TYPES


def _scalar(value: ir.Value) -> bool:
    tensor = _const(value)
    return tensor is not None and tensor.size == 1


def _const(value: ir.Value) -> ir.TensorProtocol | None:
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def _tensor(value: ir.Value) -> ir.TensorProtocol:
    """The constant behind `value`, where the pair's checks (_sole_constant) found one."""
    tensor = _const(value)
    assert tensor is not None, value.name
    return tensor


def _input(node: ir.Node, index: int) -> ir.Value:
    """An input the op requires (a valid model has it; onnx-ir types every input as optional)."""
    return cast(ir.Value, node.inputs[index])


def _dims(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    """A constant's shape: static, every dimension an int."""
    return cast("tuple[int, ...]", tuple(tensor.shape))


def _cast(value: ir.Value, array: np.ndarray) -> np.ndarray:
    """array in the dtype of the constant `value`, contiguous."""
    return np.ascontiguousarray(array, dtype=_tensor(value).dtype.numpy())


def _like(value: ir.Value, entries: np.ndarray) -> np.ndarray:
    """Entries of a 1-D constant (stored (n,) or (1, n)) in its layout and dtype, at their new count."""
    shape = (1, -1) if len(_tensor(value).shape) == 2 else (-1,)
    return _cast(value, np.reshape(entries, shape))


def _attr(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value
