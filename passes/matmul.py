"""MatMul with a constant 2-D weight: X·W -> (X·A)·B on the right, W·X -> A·(B·X) on the left."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .base import (
    Activation,
    Context,
    FactorizationRule,
    NameGenerator,
    Scheme,
    Skip,
    Target,
    known_product,
    make_node,
    required_input,
    static_shape,
)
from .weights import constant_weight, no_weight_skip


@dataclasses.dataclass(frozen=True)
class MatMulView:
    """How a MatMul reads its weight: "right" (X·W) or "left" (W·X)."""

    side: str

    @property
    def activation_index(self) -> int:
        return 0 if self.side == "right" else 1


class MatMulRule(FactorizationRule):
    op_type = "MatMul"

    def match(self, node: ir.Node, context: Context) -> Target:
        left, right = node.inputs[0], node.inputs[1]
        right_weight = constant_weight(right, inputs_as_constants=context.inputs_as_constants)
        left_weight = constant_weight(left, inputs_as_constants=context.inputs_as_constants)
        if right_weight.array is not None and left_weight.array is not None:
            raise Skip("both_constant", "both inputs are constant (fold the node instead)")
        if right_weight.array is not None:
            view, found, value = MatMulView("right"), right_weight, right
        elif left_weight.array is not None:
            view, found, value = MatMulView("left"), left_weight, left
        else:
            raise no_weight_skip(right_weight, left_weight)
        assert found.array is not None and found.dtype is not None and value is not None  # a weight was found
        if found.array.ndim != 2:
            raise Skip("weight_rank", f"weight has {found.array.ndim} dimensions (only 2-D weights are factorized)")
        return Target(node=node, weight=value, array=found.array, dtype=found.dtype, view=view, rule=self,
                      context=context, sources=found.sources)

    def matrix(self, target: Target) -> np.ndarray:
        return target.array  # X·W ≈ (X·A)·B and W·X ≈ A·(B·X): both factorize W itself

    def schemes(self, target: Target) -> list[Scheme]:
        rows, cols = target.array.shape
        view: MatMulView = target.view
        shape = static_shape(target.shapes, target.node.inputs[view.activation_index])
        if view.side == "right":
            # X (..., rows) · W (rows, cols): every leading element of X is one vector product.
            vectors = known_product(shape[:-1]) if shape else 1
        else:
            # W (rows, cols) · X (..., cols, n): every column of X is one vector product.
            vectors = known_product(shape[:-2]) * known_product(shape[-1:]) if shape and len(shape) >= 2 else 1
        return [Scheme(
            name="matmul",
            matrices=target.array[None],
            params_before=rows * cols,
            macs_before=vectors * rows * cols,
            params_per_rank=rows + cols,
            macs_per_rank=vectors * (rows + cols),
            whiten_side="rows" if view.side == "right" else "cols",
        )]

    def activation(self, target: Target) -> Activation:
        view: MatMulView = target.view
        return Activation(required_input(target.node, view.activation_index), "rows" if view.side == "right" else "cols")

    def rewrite(self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator) -> list[ir.Node]:
        node = target.node
        base = node.name or "MatMul"
        x = node.inputs[target.view.activation_index]
        if target.view.side == "right":
            first = make_node("MatMul", [x, a], names(f"{base}_lr1"), names(f"{base}_lr_mid"))
            second = make_node("MatMul", [first.outputs[0], b], names(f"{base}_lr2"), names(f"{base}_lr_out"))
        else:
            first = make_node("MatMul", [b, x], names(f"{base}_lr1"), names(f"{base}_lr_mid"))
            second = make_node("MatMul", [a, first.outputs[0]], names(f"{base}_lr2"), names(f"{base}_lr_out"))
        return [first, second]
