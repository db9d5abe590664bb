"""What every factorization rule shares: targets, schemes, skip reasons, and the rule protocol.

A rule (one module per op family, after onnxscript's rewriter: match / schemes / rewrite) answers
questions about one node:
- `match`: is this node a target, and which input is its constant weight? If not, `Skip` with a
  stable reason code and a sentence.
- `schemes`: which matrix views of the weight can be factorized, what does each cost, and which
  side of the view the activation enters (the views calibration can whiten)?
- `activation`: which input the weight multiplies, and how calibration reads its vectors.
- `rewrite`: given two factor tensors, which two nodes replace the original?
A rule whose targets take no calibration statistics sets `calibrated = False` (its `activation`
is then never asked).
A rule knows nothing about SVD or ranks; the planner (onnxlr.factorize.plan) and the rewrite stage
(onnxlr.factorize.rewrite) call it. `onnxlr.api.FactorizationPass` is the onnx-ir pass that applies
the rule set to a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)

# Every reason a node or a weight is left as it is: the code is stable (reports carry it as
# `reason_code`, scripts and tests match it); the sentence beside it in a report says the details.
REASON_CODES = {
    "missing_input": "the node's weight input is missing",
    "graph_input": "the weight is a graph input (it can be overridden at run time; --inputs-as-constants)",
    "graph_output": "the weight is also a graph output",
    "runtime_weight": "the weight is computed at run time",
    "generated_weight": "the weight is generated at run time from a few constants (ConstantOfShape, EyeLike, Range, "
                        "Random*): materializing it would grow the file",
    "custom_op_weight": "the weight comes from a custom-domain op",
    "constant_without_value": "a Constant node without a tensor value",
    "quantized_weight": "the weight comes from a quantize/dequantize op",
    "non_float_cast": "the weight is cast to a non-float type",
    "runtime_reshape": "the weight is reshaped to a shape computed at run time",
    "both_constant": "both inputs are constant (fold the node instead)",
    "weight_rank": "the weight has a number of dimensions the op's rewrite does not take",
    "old_opset": "the op's opset is older than the rewrite supports",
    "bad_group": "the conv's group does not divide its output channels",
    "depthwise": "depthwise conv: one input channel per group, nothing to factorize",
    "unsupported_op": "an op type onnxlr does not factorize (yet)",
    "quantized_op": "a quantized op, left as it is",
    "dtype": "the weight's dtype is not a float type",
    "empty_weight": "the weight has a zero-sized dimension",
    "non_finite_weight": "the weight has NaN or Inf values",
    "not_included": "the node's name matches no --include pattern",
    "excluded": "the node's name matches an --exclude pattern",
    "shared_with_other_op": "the weight is also read by a node that cannot be rewritten",
    "shared_differently": "the weight is shared by nodes that read it differently",
    "min_params": "the weight has fewer than --min-params parameters",
    "precision_planned": "--quantize auto plans each weight's precision and correction, not a low rank",
    "no_gain": "the factor pair at the planned rank is not smaller and cheaper (break-even)",
    "no_file_gain": "the factors would take no fewer bytes in the file than the weight they replace (a safety "
                    "net: the planner should not have chosen it)",
    "kept_dense_by_budget": "the whole-model budget allocation left the layer dense",
    "target_not_reached": "no budget reaches the --target-cosine/--target-error goal",
    "not_faster": "--objective latency: no factor pair of the layer measured faster than the original node",
    "not_faster_in_model": "--objective latency: the rewrite did not pay in the whole model (profiled or timed end "
                           "to end against the original), so the layer was put back",
    "not_timed": "--objective latency: the layer could not be timed (a non-float input, dynamic dims, or not in "
                 "--latency-table)",
}


class Skip(Exception):
    """Raised by `match` when a node cannot be factorized: a stable code and a user-facing sentence."""

    def __init__(self, code: str, message: str) -> None:
        assert code in REASON_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


# Before IR version 4 the spec required every initializer to be listed as a graph input too: such
# inputs are the model's weights, and new initializers must be listed the same way.
INITIALIZERS_ARE_INPUTS_BEFORE_IR = 4


@dataclasses.dataclass
class Context:
    """Model-wide facts a rule may need: inferred shapes (by value name), the default-domain opset, and
    whether initializers listed as graph inputs count as constant weights (see `inputs_are_weights`)."""

    shapes: Mapping[str, tuple | None]
    opset: int
    inputs_as_constants: bool = False


def old_ir(model: ir.Model) -> bool:
    """True for IR versions < 4, where every initializer is (and must be) listed as a graph input."""
    version = model.ir_version or 0
    return 0 < version < INITIALIZERS_ARE_INPUTS_BEFORE_IR


def inputs_are_weights(model: ir.Model, inputs_as_constants: bool = False) -> bool:
    """Whether initializers listed as graph inputs are weights: always before IR 4, else when asked to."""
    return bool(inputs_as_constants) or old_ir(model)


@dataclasses.dataclass
class Target:
    """A node with a constant weight that a rule can factorize."""

    node: ir.Node
    weight: ir.Value  # the node input that carries the weight
    array: np.ndarray  # the weight's value (constant chains already folded)
    dtype: ir.DataType
    # How the node reads its weight (a frozen dataclass of the rule: MatMulView, GemmView, ConvView).
    # Users of one weight share a factorization only if their views are equal.
    view: Any
    rule: FactorizationRule
    context: Context
    sources: tuple[ir.Value, ...] = ()  # the initializers or Constant outputs the weight was folded from

    @property
    def shapes(self) -> Mapping[str, tuple | None]:
        return self.context.shapes

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or "?"

    @property
    def root(self) -> ir.Value:
        """The stored tensor (initializer or Constant output) the weight is a view of."""
        return self.sources[0] if self.sources else self.weight

    @property
    def weight_input(self) -> int:
        """The index of the node input that carries the weight."""
        return next(i for i, value in enumerate(self.node.inputs) if value is self.weight)


@dataclasses.dataclass
class Scheme:
    """One way to view a weight as (groups, m, n) matrices, with its costs at rank r."""

    name: str
    matrices: np.ndarray  # (groups, m, n)
    params_before: int  # weight (+ bias) parameters of the original node
    macs_before: int
    params_per_rank: int  # parameters of the factor pair per unit of rank (all groups)
    macs_per_rank: int
    fixed_params: int = 0  # parameters kept as they are (the bias)
    # Which side of the (m, n) view the activation vectors enter: "rows" (x·W) or "cols" (W·x), as
    # lowrank.whitened_svd takes it; None when calibration statistics do not apply to this view.
    whiten_side: str | None = None
    # A lookup table's view: the factorized lookup multiplies where the original only copied rows, so
    # it gains by its parameters alone (it trades MACs for bytes).
    size_only: bool = False

    @property
    def full_rank(self) -> int:
        return min(self.matrices.shape[1], self.matrices.shape[2])

    def params_after(self, rank: int) -> int:
        return rank * self.params_per_rank + self.fixed_params

    def macs_after(self, rank: int) -> int:
        return rank * self.macs_per_rank

    def gains(self, rank: int) -> bool:
        """True when the pair at `rank` has fewer parameters and fewer MACs than the original."""
        return self.params_after(rank) < self.params_before and (
            self.size_only or self.macs_after(rank) < max(self.macs_before, 1))

    @property
    def break_even_rank(self) -> int:
        """Smallest rank at which the pair is no smaller or no cheaper than the original."""
        rank = 1
        while rank <= self.full_rank and self.gains(rank):
            rank += 1
        return rank


@dataclasses.dataclass(frozen=True)
class Activation:
    """The input a target's weight multiplies, and how calibration turns it into vectors.

    layout "rows": the vectors lie along the last axis; "cols": along the second-to-last;
    "patches": a conv's input, whose vectors are the patches its kernel sees (`patches` holds the
    conv attributes that decide them: kernel_shape, strides, dilations, pads or auto_pad).
    """

    value: ir.Value
    layout: str
    groups: int = 1
    patches: Mapping[str, Any] | None = None


class FactorizationRule:
    """Base class; subclasses set `op_type` and implement match / schemes / activation / rewrite."""

    op_type: str = ""
    # Whether calibration reads statistics for this rule's targets (`activation` answers); False:
    # calibration leaves its targets out and they take the plain SVD.
    calibrated: bool = True

    def match(self, node: ir.Node, context: Context) -> Target:
        raise NotImplementedError

    def schemes(self, target: Target) -> list[Scheme]:
        raise NotImplementedError

    def activation(self, target: Target) -> Activation:
        """What calibration reads for this target (the input the weight multiplies)."""
        raise NotImplementedError

    def rewrite(
        self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator
    ) -> list[ir.Node]:
        """Return the new nodes; the last one's outputs replace the node's outputs, one for one."""
        raise NotImplementedError

    def matrix(self, target: Target) -> np.ndarray | None:
        """The 2-D matrix the factor pair approximates, as the node reads it (X·W: W; Gemm: op(W)), or
        None when the weight is no plain matrix (a conv kernel, an RNN's stacked gates). Readers of one
        weight that see this matrix or its transpose share one factor pair (onnxlr.factorize.targets)."""
        return None

    def fixed_inputs(self, target: Target) -> list[ir.Value]:
        """Inputs kept as they are whose parameters a scheme counts (`fixed_params`: the bias)."""
        return []

    def factor_tensors(self, target: Target, scheme: Scheme, a: np.ndarray, b: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Turn factor stacks into the two weight tensors the new nodes read (default: 2-D)."""
        return a[0], b[0]

    def dense_weight(self, target: Target, scheme: Scheme, matrices: np.ndarray) -> np.ndarray:
        """The inverse of the scheme's view: (groups, m, n) matrices back to the weight as the node reads it.

        Calibration feeds the product A @ B this way to measure a factorization without rewriting
        the graph (default: the 2-D weight itself)."""
        return matrices[0]


# ----------------------------------------------------------------------------- helpers for rules
class NameGenerator:
    """Unique names for new values and nodes, never clashing with any name in the model."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        for graph in model.graphs():
            self._taken.update(v.name for v in graph.inputs if v.name)
            self._taken.update(graph.initializers.keys())
            for node in graph:
                if node.name:
                    self._taken.add(node.name)
                self._taken.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        name, index = base, 1
        while name in self._taken:
            name = f"{base}_{index}"
            index += 1
        self._taken.add(name)
        return name


def attribute(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def required_input(node: ir.Node, index: int) -> ir.Value:
    """An input the op requires: a valid model has it (onnx-ir types every input as optional)."""
    return cast(ir.Value, node.inputs[index])


def static_shape(shapes: Mapping[str, tuple | None], value: ir.Value | None) -> tuple | None:
    """The value's inferred shape with unknown dimensions as None, or None if the rank is unknown."""
    if value is None:
        return None
    return shapes.get(value.name or "")


def known_product(dims: Sequence[Any]) -> int:
    """Product of the known dimensions (unknown ones count as 1: MACs are then per unit of them)."""
    product = 1
    for dim in dims:
        if isinstance(dim, int) and dim >= 0:
            product *= dim
    return product


def make_node(op_type: str, inputs: Sequence[ir.Value | None], name: str, output_name: str,
              attributes: Mapping[str, Any] | None = None) -> ir.Node:
    attrs = ir.convenience.convert_attributes(dict(attributes or {}))
    output = ir.Value(name=output_name)
    return ir.Node("", op_type, inputs=list(inputs), attributes=attrs, outputs=[output], name=name)


def copy_attributes(node: ir.Node, names: Sequence[str]) -> dict[str, Any]:
    """The named attributes of `node` that are set, as plain Python values."""
    return {name: node.attributes[name].value for name in names if name in node.attributes}
