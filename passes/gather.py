"""Gather (a row lookup) of an embedding table: `Gather(E, ids)` becomes `MatMul(Gather(A, ids), B)`.

With E ≈ A·B this is exact for axis 0 (row i of A·B is row i of A times B). A language model's input
embedding is often the output head's weight too (the head reads Eᵀ): such a Gather joins the
weight's group as one more reader, so the table's factors serve both (the head reads Bᵀ·Aᵀ). With
`--ops ...,Gather` a table only lookups read is a target of its own (`is_table_lookup`), its rank
chosen by the same policies and budgets; with calibration data its rows are weighted by how often
each id occurs (onnxlr.calibrate.datafit.row_weights).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .base import (
    Context,
    FactorizationRule,
    NameGenerator,
    Scheme,
    Skip,
    Target,
    attribute,
    known_product,
    make_node,
    static_shape,
)
from .weights import constant_weight


@dataclasses.dataclass(frozen=True)
class GatherView:
    """A row lookup (axis 0) of a 2-D table."""


def is_table_lookup(node: ir.Node, context: Context) -> bool:
    """A Gather of a 2-D float constant table (not an index lookup in a shape, a 1-D or an integer table)."""
    if len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    found = constant_weight(node.inputs[0], inputs_as_constants=context.inputs_as_constants)
    return found.array is not None and found.array.ndim == 2 and found.array.dtype.kind == "f" and \
        min(found.array.shape) > 1


class GatherRule(FactorizationRule):
    op_type = "Gather"
    calibrated = False  # a lookup multiplies nothing: no activation to take statistics of

    def match(self, node: ir.Node, context: Context) -> Target:
        found = constant_weight(node.inputs[0], inputs_as_constants=context.inputs_as_constants)
        if found.array is None:
            raise found.skip()
        if found.array.ndim != 2:
            raise Skip("weight_rank", f"the table Gather reads has {found.array.ndim} dimensions (2 are shared)")
        axis = attribute(node, "axis", 0)
        if axis not in (0, -2):
            raise Skip("shared_differently", f"Gather reads the table along axis {axis} (only row lookups share "
                                             "factors)")
        assert found.dtype is not None and node.inputs[0] is not None  # the weight was found there
        return Target(node=node, weight=node.inputs[0], array=found.array, dtype=found.dtype, view=GatherView(),
                      rule=self, context=context, sources=found.sources)

    def matrix(self, target: Target) -> np.ndarray:
        return target.array

    def schemes(self, target: Target) -> list[Scheme]:
        rows, cols = target.array.shape
        indices = static_shape(target.shapes, target.node.inputs[1])
        lookups = known_product(indices) if indices is not None else 1
        return [Scheme(
            name="gather",
            matrices=target.array[None],
            params_before=rows * cols,
            macs_before=0,  # a lookup; the factorized one multiplies each looked-up row of A by B
            params_per_rank=rows + cols,
            macs_per_rank=lookups * cols,
            size_only=True,
        )]

    def rewrite(self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator) -> list[ir.Node]:
        node = target.node
        base = node.name or "Gather"
        lookup = make_node("Gather", [a, node.inputs[1]], names(f"{base}_lr1"), names(f"{base}_lr_mid"))
        expand = make_node("MatMul", [lookup.outputs[0], b], names(f"{base}_lr2"), names(f"{base}_lr_out"))
        return [lookup, expand]
