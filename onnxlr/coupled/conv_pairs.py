"""Conv channel pairs: two convolutions joined only by per-channel ops.

    up:   h = Conv(X, W1 [, b1])        group=1, W1 (D, C_in, *k1)
          [BatchNormalization(h)]       inference form: scale, B, mean, var of shape (D,)
          a = f(h)                      an elementwise region (as onnxlr.coupled.pairs), with MaxPool, AveragePool,
                                        their Global forms and Identity anywhere in it
    down: y = Conv(a, W2 [, b2])        group=1, W2 (C_out, D, *k2)

Each op between the two convs maps channel j to channel j alone, so a neuron is one output channel
of the up conv (W1[j], b1[j], the BatchNormalization entries j) and one input channel of the down
conv (W2[:, j]). As X·W the down conv is W2.reshape(C_out, -1).T, (D·kh·kw, C_out) with row
j·(kh·kw) + tap: the layout of its calibration patches (onnxlr.calibrate.calibration.vectors, "patches"),
so neuron j owns a block of kh·kw consecutive rows (ConvPair.block).
"""

from __future__ import annotations

import dataclasses
import math
from typing import cast

import numpy as np
import onnx_ir as ir

from onnxlr.coupled.pairs import (
    FLOAT_TYPES,
    CoupledPair,
    Slice,
    _attr,
    _bias_problem,
    _cast,
    _const,
    _dims,
    _down_reader,
    _joins,
    _like,
    _region,
    _sole_constant,
    _tensor,
)

POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"})
NORM_INPUTS = ("scale", "B", "input_mean", "input_var")


@dataclasses.dataclass
class ConvLayer:
    node: ir.Node  # Conv with the constant weight (out, in, *kernel) as input 1
    weight: ir.Value
    bias: ir.Value | None  # input 2, (out,)

    bias_node = None  # as pairs.Linear: the bias is the node's own input

    def array(self) -> np.ndarray:
        return _tensor(self.weight).numpy()

    @property
    def kernel(self) -> tuple[int, ...]:
        return _dims(_tensor(self.weight))[2:]

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def shape(self) -> tuple[int, int]:
        """(in·taps, out): the X·W matrix's."""
        out, inputs = _dims(_tensor(self.weight))[:2]
        return inputs * self.taps, out

    def matrix(self) -> np.ndarray:
        """(in·taps, out) X·W, row c·taps + tap (the calibration patches' order)."""
        array = self.array()
        return array.reshape(array.shape[0], -1).T

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else _tensor(self.bias).numpy().reshape(-1)

    @property
    def bias_reader(self) -> ir.Node:
        return self.node

    @property
    def params_per_out(self) -> int:
        return self.shape[0] + (self.bias is not None)

    def stored(self, matrix: np.ndarray) -> np.ndarray:
        """A (c·taps, out) X·W matrix as the weight stores it: (out, c, *kernel), its dtype."""
        return _cast(self.weight, matrix.T.reshape(matrix.shape[1], -1, *self.kernel))

    def out_slices(self, kept: np.ndarray) -> list[Slice]:
        """The weight's and bias's output channels `kept`."""
        slices = [(self.node, self.weight, _cast(self.weight, self.array()[kept]))]
        if self.bias is not None:
            bias = self.bias_array()
            assert bias is not None  # there is a bias input
            slices.append((self.node, self.bias, _like(self.bias, bias[kept])))
        return slices


@dataclasses.dataclass
class BatchNorm:
    node: ir.Node  # BatchNormalization (inference: one output), its four (D,) constants read by it alone

    params_per_out = len(NORM_INPUTS)

    def out_slices(self, kept: np.ndarray) -> list[Slice]:
        constants = cast("list[ir.Value]", self.node.inputs[1:5])  # all present: _norm_problem checked them
        return [(self.node, value, _like(value, _tensor(value).numpy().reshape(-1)[kept])) for value in constants]


@dataclasses.dataclass
class ConvPair(CoupledPair):
    up: ConvLayer
    down: ConvLayer
    activation: ir.Value  # the down conv's input 0
    width: int  # D: up's output channels == down's input channels
    norm: BatchNorm | None = None  # between the up conv and the region

    kind = "conv"

    @property
    def block(self) -> int:
        """Rows of the down matrix per neuron: the down kernel's taps."""
        return self.down.taps

    def up_layers(self) -> list[ConvLayer]:
        return [self.up]

    def _channel_layers(self) -> list[ConvLayer | BatchNorm]:
        return [self.up] + ([self.norm] if self.norm else [])


def find_conv_pairs(model: ir.Model) -> tuple[list[ConvPair], list[tuple[ir.Node, str]]]:
    """Pairs in graph order; and (conv node, reason) for convs that start a per-channel region but are not coupled."""
    pairs: list[ConvPair] = []
    rejected: list[tuple[ir.Node, str]] = []
    for node in model.graph:
        up = _read_conv(node)
        if up is None:
            continue
        norm = _norm_after(node.outputs[0])
        start = norm.node.outputs[0] if norm else node.outputs[0]
        region_nodes, region_values = _region([start], _channel_joins)
        if not region_nodes:
            continue  # a conv straight into another layer, a residual Add, ...: not a candidate
        if norm:  # the conv's own output belongs to the pattern too (nothing else may read it)
            region_nodes, region_values = [norm.node, *region_nodes], [node.outputs[0], *region_values]
        result = _pair(up, norm, region_nodes, region_values)
        if isinstance(result, ConvPair):
            pairs.append(result)
        else:
            rejected.append((node, result))
    return pairs, rejected


def _pair(up: ConvLayer, norm: BatchNorm | None, region_nodes: list[ir.Node], region_values: list[ir.Value]
          ) -> ConvPair | str:
    problem = _problem(up) or (_norm_problem(norm, up.shape[1]) if norm else None)
    if problem:
        return problem
    found = _down_reader(region_nodes, region_values, _read_conv, "a Conv")
    if isinstance(found, str):
        return found
    down, activation = found
    problem = _problem(down)
    if problem:
        return f"down Conv node '{down.node.name}': {problem}"
    channels = _dims(_tensor(down.weight))[1]
    if up.shape[1] != channels:
        return f"channels differ: up has {up.shape[1]} output channels, down {down.node.name!r} {channels} input channels"
    if _tensor(up.weight).dtype != _tensor(down.weight).dtype:
        return f"weight types differ: {_tensor(up.weight).dtype} and {_tensor(down.weight).dtype}"
    return ConvPair(up=up, down=down, activation=activation, width=channels, norm=norm)


def _read_conv(node: ir.Node) -> ConvLayer | None:
    """node as a Conv with a constant weight (checked later by _problem), else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "Conv" or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None or _const(weight) is None or node.inputs[0] is None:
        return None
    return ConvLayer(node, weight, node.inputs[2] if len(node.inputs) > 2 else None)


def _problem(conv: ConvLayer) -> str | None:
    """Why this conv cannot have its channels sliced, or None."""
    group = _attr(conv.node, "group", 1)
    if group != 1:
        return f"Conv has group={group}"
    problem = _sole_constant(conv.weight, conv.node, "weight")
    if problem:
        return problem
    tensor = _tensor(conv.weight)
    if len(tensor.shape) < 3 or tensor.dtype not in FLOAT_TYPES:
        return f"weight '{conv.weight.name}' is not a float conv kernel"
    return None if conv.bias is None else _bias_problem(conv.bias, conv.node, conv.shape[1])


def _norm_after(output: ir.Value) -> BatchNorm | None:
    """The BatchNormalization reading the conv's output as its input 0, if any (its problems come later)."""
    for use in output.uses():
        node = use.node
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and use.idx == 0:
            return BatchNorm(node)
    return None


def _norm_problem(norm: BatchNorm, channels: int) -> str | None:
    node = norm.node
    if len(node.outputs) != 1 or _attr(node, "training_mode", 0) != 0 or len(node.inputs) != 5:
        return f"BatchNormalization node '{node.name}' is in training mode"
    for value, name in zip(node.inputs[1:], NORM_INPUTS):
        problem = _sole_constant(value, node, name) if value is not None else f"{name} is missing"
        if problem is None and value is not None and _tensor(value).size != channels:
            problem = f"{name} '{value.name}' does not have {channels} entries"
        if problem:
            return f"BatchNormalization node '{node.name}': {problem}"
    return None


def _channel_joins(node: ir.Node, known: set[int]) -> bool:
    """Elementwise ops (as MLP regions) and pooling of a region value: both keep channel j in channel j."""
    if node.op_type in POOL_OPS and node.domain in ("", "ai.onnx"):
        return len(node.inputs) == 1 and id(node.inputs[0]) in known
    return _joins(node, known)
