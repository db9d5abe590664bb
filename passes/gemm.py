"""Gemm (Y = alpha·op(A)·op(B) + beta·C) with a constant A or B.

The weight's effective matrix W = op(weight) is factorized as P·Q. Both factors are stored in the
weight's original layout (transposed when transA/transB was set) so the new Gemms keep the same
trans flags. alpha, beta and C go on the second node, which therefore has the original output's
shape and semantics for every allowed combination of C (absent, scalar, row, column, full).
"""

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
    attribute,
    make_node,
    required_input,
)
from .weights import constant_weight, no_weight_skip


@dataclasses.dataclass(frozen=True)
class GemmView:
    """How a Gemm reads its weight: as operand "A" or "B", and whether its trans flag is set."""

    operand: str
    transposed: bool


class GemmRule(FactorizationRule):
    op_type = "Gemm"

    def match(self, node: ir.Node, context: Context) -> Target:
        opset = context.opset
        if opset < 7:
            raise Skip("old_opset", f"Gemm at opset {opset} (< 7) is not rewritten")
        constants = context.inputs_as_constants
        a_weight = constant_weight(node.inputs[0], inputs_as_constants=constants)
        b_weight = constant_weight(node.inputs[1], inputs_as_constants=constants)
        if a_weight.array is not None and b_weight.array is not None:
            raise Skip("both_constant", "both inputs are constant (fold the node instead)")
        if b_weight.array is not None:
            view, found = GemmView("B", bool(attribute(node, "transB", 0))), b_weight
        elif a_weight.array is not None:
            view, found = GemmView("A", bool(attribute(node, "transA", 0))), a_weight
        else:
            raise no_weight_skip(b_weight, a_weight)
        assert found.array is not None and found.dtype is not None  # a weight was found
        if found.array.ndim != 2:
            raise Skip("weight_rank", f"weight has {found.array.ndim} dimensions (Gemm needs 2)")
        value = node.inputs[1] if view.operand == "B" else node.inputs[0]
        assert value is not None  # it holds the weight
        return Target(node=node, weight=value, array=found.array, dtype=found.dtype, view=view, rule=self,
                      context=context, sources=found.sources)

    def _effective(self, target: Target) -> np.ndarray:
        return target.array.T if target.view.transposed else target.array

    def matrix(self, target: Target) -> np.ndarray:
        return self._effective(target)

    def fixed_inputs(self, target: Target) -> list[ir.Value]:
        bias = target.node.inputs[2] if len(target.node.inputs) > 2 else None
        return [bias] if bias is not None else []

    def schemes(self, target: Target) -> list[Scheme]:
        w = self._effective(target)  # B: (K, N); A: (M, K)
        rows, cols = w.shape
        vectors = _other_dim(target)
        bias = target.node.inputs[2] if len(target.node.inputs) > 2 else None
        bias_params = _const_size(bias, target.context.inputs_as_constants)
        return [Scheme(
            name="gemm",
            matrices=w[None],
            params_before=rows * cols + bias_params,
            macs_before=vectors * rows * cols,
            params_per_rank=rows + cols,
            macs_per_rank=vectors * (rows + cols),
            fixed_params=bias_params,
            # op(A)·W: the rows of op(A) enter a B weight; W·op(B): the columns of op(B) enter an A weight.
            whiten_side="rows" if target.view.operand == "B" else "cols",
        )]

    def activation(self, target: Target) -> Activation:
        node = target.node
        if target.view.operand == "B":  # rows of op(A): A's columns when transA is set
            return Activation(required_input(node, 0), "cols" if attribute(node, "transA", 0) else "rows")
        # operand A: columns of op(B), i.e. B's rows when transB is set
        return Activation(required_input(node, 1), "rows" if attribute(node, "transB", 0) else "cols")

    def factor_tensors(self, target: Target, scheme: Scheme, a: np.ndarray, b: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        # Keep the weight's layout: with trans set, each factor is stored transposed.
        p, q = a[0], b[0]
        if target.view.transposed:
            p, q = p.T, q.T
        return p, q

    def dense_weight(self, target: Target, scheme: Scheme, matrices: np.ndarray) -> np.ndarray:
        return matrices[0].T if target.view.transposed else matrices[0]

    def rewrite(self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator) -> list[ir.Node]:
        node = target.node
        base = node.name or "Gemm"
        trans = int(target.view.transposed)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        tail = {"alpha": float(attribute(node, "alpha", 1.0)), "beta": float(attribute(node, "beta", 1.0))}
        if target.view.operand == "B":
            # Y = alpha·(op(A)·P)·Q + beta·C
            first_inputs = [node.inputs[0], a]
            first_attrs = {"transA": int(attribute(node, "transA", 0)), "transB": trans}
            second_attrs = {"transB": trans, **tail}
        else:
            # Y = alpha·P·(Q·op(B)) + beta·C
            first_inputs = [b, node.inputs[1]]
            first_attrs = {"transA": trans, "transB": int(attribute(node, "transB", 0))}
            second_attrs = {"transA": trans, **tail}
        zero = None
        if target.context.opset < 11:
            # Before opset 11, C is required: the first Gemm (and a C-less second) get a zero bias.
            zero_name = names(f"{base}_lr_zero")
            zero = ir.Value(name=zero_name, const_value=ir.Tensor(
                np.zeros((1,), dtype=target.dtype.numpy()), dtype=target.dtype, name=zero_name))
            assert node.graph is not None  # a target is a node of a graph
            node.graph.register_initializer(zero)
            first_inputs.append(zero)
        first = make_node("Gemm", first_inputs, names(f"{base}_lr1"), names(f"{base}_lr_mid"),
                          _drop_defaults(first_attrs))
        middle = first.outputs[0]
        second_inputs: list[ir.Value | None] = [middle, b] if target.view.operand == "B" else [a, middle]
        if c is not None or zero is not None:
            second_inputs.append(c if c is not None else zero)
        second = make_node("Gemm", second_inputs, names(f"{base}_lr2"), names(f"{base}_lr_out"),
                           _drop_defaults(second_attrs))
        return [first, second]


def _drop_defaults(attrs: dict) -> dict:
    defaults = {"transA": 0, "transB": 0, "alpha": 1.0, "beta": 1.0}
    return {k: v for k, v in attrs.items() if defaults.get(k) != v}


def _other_dim(target: Target) -> int:
    """Length of the activation's free dimension (M for a B weight, N for an A weight), 1 if unknown."""
    node = target.node
    if target.view.operand == "B":
        shape = target.shapes.get(required_input(node, 0).name or "")
        index = 1 if attribute(node, "transA", 0) else 0
    else:
        shape = target.shapes.get(required_input(node, 1).name or "")
        index = 0 if attribute(node, "transB", 0) else 1
    if shape and len(shape) == 2 and isinstance(shape[index], int):
        return shape[index]
    return 1


def _const_size(value: ir.Value | None, inputs_as_constants: bool) -> int:
    if value is None:
        return 0
    found = constant_weight(value, inputs_as_constants=inputs_as_constants)
    return int(found.array.size) if found.array is not None else 0
