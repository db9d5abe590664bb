"""MatMul with a constant 2-D weight: X·W -> (X·A)·B on the right, W·X -> A·(B·X) on the left."""

from __future__ import annotations

import onnx_ir as ir

from .base import (
    Context,
    FactorizationPass,
    NameGenerator,
    Scheme,
    Skip,
    Target,
    known_product,
    make_node,
    static_shape,
)
from .weights import constant_weight, no_weight_reason


class MatMulFactorization(FactorizationPass):
    op_type = "MatMul"

    def match(self, node: ir.Node, context: Context) -> Target:
        left, right = node.inputs[0], node.inputs[1]
        right_weight = constant_weight(right)
        left_weight = constant_weight(left)
        if right_weight.array is not None and left_weight.array is not None:
            raise Skip("both inputs are constant (fold the node instead)")
        if right_weight.array is not None:
            role, found = "right", right_weight
        elif left_weight.array is not None:
            role, found = "left", left_weight
        else:
            raise Skip(no_weight_reason(right_weight, left_weight))
        value = right if role == "right" else left
        if found.array.ndim != 2:
            raise Skip(f"weight has {found.array.ndim} dimensions (only 2-D weights are factorized)")
        return Target(node=node, weight=value, array=found.array, dtype=found.dtype, role=role,
                      view_key=("matmul",), handler=self, context=context)

    def schemes(self, target: Target) -> list[Scheme]:
        rows, cols = target.array.shape
        activation = target.node.inputs[0 if target.role == "right" else 1]
        shape = static_shape(target.shapes, activation)
        if target.role == "right":
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
        )]

    def rewrite(self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator) -> list[ir.Node]:
        node = target.node
        base = node.name or "MatMul"
        x = node.inputs[0] if target.role == "right" else node.inputs[1]
        if target.role == "right":
            first = make_node("MatMul", [x, a], names(f"{base}_lr1"), names(f"{base}_lr_mid"))
            second = make_node("MatMul", [first.outputs[0], b], names(f"{base}_lr2"), names(f"{base}_lr_out"))
        else:
            first = make_node("MatMul", [b, x], names(f"{base}_lr1"), names(f"{base}_lr_mid"))
            second = make_node("MatMul", [a, first.outputs[0]], names(f"{base}_lr2"), names(f"{base}_lr_out"))
        return [first, second]

