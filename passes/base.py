"""What every factorization pass shares: targets, schemes, and the pass wrapper.

A pass (one module per op family) answers three questions about a node:
- `match`: is this node a target, and which input is its constant weight? If not, why not.
- `schemes`: which matrix views of the weight can be factorized, and what does each cost?
- `rewrite`: given two factor stacks A (groups, m, r) and B (groups, r, n) with A @ B ~= matrix view,
  which two nodes replace the original?
It knows nothing about SVD or ranks; onnxlr.factorize does the planning and calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


class Skip(Exception):
    """Raised by `match` when a node cannot be factorized; the message is the user-facing reason."""


@dataclasses.dataclass
class Context:
    """Model-wide facts a pass may need: inferred shapes (by value name) and the default-domain opset."""

    shapes: Mapping[str, tuple | None]
    opset: int


@dataclasses.dataclass
class Target:
    """A node with a constant weight that a pass can factorize."""

    node: ir.Node
    weight: ir.Value  # the node input that carries the weight
    array: np.ndarray  # the weight's value (constant chains already folded)
    dtype: ir.DataType
    role: str  # which side the weight is on, e.g. "right", "left", "B", "A", "kernel"
    view_key: tuple  # users of one weight share a factorization only if their view_key is equal
    handler: FactorizationPass
    context: Context

    @property
    def shapes(self) -> Mapping[str, tuple | None]:
        return self.context.shapes

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or "?"


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

    @property
    def full_rank(self) -> int:
        return min(self.matrices.shape[1], self.matrices.shape[2])

    def params_after(self, rank: int) -> int:
        return rank * self.params_per_rank + self.fixed_params

    def macs_after(self, rank: int) -> int:
        return rank * self.macs_per_rank

    def gains(self, rank: int) -> bool:
        """True when the pair at `rank` has fewer parameters and fewer MACs than the original."""
        return self.params_after(rank) < self.params_before and self.macs_after(rank) < max(self.macs_before, 1)

    @property
    def break_even_rank(self) -> int:
        """Smallest rank at which the pair is no smaller or no cheaper than the original."""
        rank = 1
        while rank <= self.full_rank and self.gains(rank):
            rank += 1
        return rank


class FactorizationPass(ir.passes.InPlacePass):
    """Base class; subclasses set `op_type` and implement match / schemes / rewrite.

    Used alone, a pass runs the whole onnxlr pipeline restricted to its op type:
    `MatMulFactorization(rank_ratio=0.25)(ir_model)` (onnx-ir pass protocol), or
    `MatMulFactorization(rank_ratio=0.25).apply(model)` for a path, ModelProto or graphsurgeon Graph.
    """

    op_type: str = ""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = settings
        self.report: dict | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxlr.factorize import Settings, factorize_model

        report = factorize_model(model, Settings(**{**self.settings, "ops": (self.op_type,)}))
        self.report = report
        modified = any(layer["status"] == "factorized" for layer in report["layers"])
        return ir.passes.PassResult(model, modified=modified)

    def apply(self, model: Any) -> tuple[Any, dict]:
        """Factorize any supported model kind; returns (model of the same kind, report)."""
        import onnxlr

        return onnxlr.optimize(model, **{**self.settings, "ops": (self.op_type,)})

    # --- the three questions; subclasses answer them
    def match(self, node: ir.Node, context: Context) -> Target:
        raise NotImplementedError

    def schemes(self, target: Target) -> list[Scheme]:
        raise NotImplementedError

    def rewrite(
        self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator
    ) -> list[ir.Node]:
        """Return the new nodes; the last one's first output replaces the node's output."""
        raise NotImplementedError

    def factor_tensors(self, target: Target, scheme: Scheme, a: np.ndarray, b: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Turn factor stacks into the two weight tensors the new nodes read (default: 2-D)."""
        return a[0], b[0]

    def dense_weight(self, target: Target, scheme: Scheme, matrices: np.ndarray) -> np.ndarray:
        """The inverse of the scheme's view: (groups, m, n) matrices back to the weight as the node reads it.

        Calibration feeds the product A @ B this way to measure a factorization without rewriting
        the graph (default: the 2-D weight itself)."""
        return matrices[0]


# ----------------------------------------------------------------------------- helpers for passes


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
