"""LSTM, GRU and RNN with a constant input weight W: LSTM(X, W, R, ...) -> LSTM(X·A, B, R, ...).

W is [num_directions, gates·hidden, input_size] (LSTM 4 gates, GRU 3, RNN 1); each step computes
X_t·W_dᵀ for every direction d. Both directions read the same X, so the input weights of all
directions are viewed side by side as one matrix M = [W_0ᵀ | W_1ᵀ] (input x directions·gates·hidden)
and factorized once, M ≈ A·B': A (input x r) becomes a MatMul on X's last axis (X is
[seq, batch, input] with layout 0 and [batch, seq, input] with layout 1; the MatMul works for
both), and the columns of B' that belong to direction d, transposed, are the new W's B_d
(gates·hidden x r). The op then reads an r-sized input; its other inputs (R, the bias B,
sequence_lens, initial_h, initial_c, P) and attributes stay as they are, and every output
(Y, Y_h, Y_c) is the new op's.

R (the recurrent weights, hidden x hidden per gate) is left alone: the recurrence feeds each
step's output back into the next step, so a factor pair of R would need an extra MatMul inside
the loop, which ONNX's fused recurrent ops cannot express.

Calibration does not apply to these rules yet (`calibrated = False`): calibration reads no
statistics for them and they are factorized with the plain SVD.
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
    known_product,
    make_node,
    static_shape,
)
from .weights import constant_weight

WEIGHT_INPUT = 1  # X, W, R, B, sequence_lens, initial_h[, initial_c, P]


@dataclasses.dataclass(frozen=True)
class RecurrentView:
    """How a recurrent op reads its input weight: with `directions` stacked input matrices."""

    directions: int


class RecurrentRule(FactorizationRule):
    """Shared by LSTM, GRU and RNN; subclasses set `op_type` and `gates`."""

    gates = 1
    calibrated = False

    def match(self, node: ir.Node, context: Context) -> Target:
        if len(node.inputs) <= WEIGHT_INPUT or node.inputs[WEIGHT_INPUT] is None:
            raise Skip("missing_input", "the input weight W is missing")
        value = node.inputs[WEIGHT_INPUT]
        found = constant_weight(value, inputs_as_constants=context.inputs_as_constants)
        if found.array is None:
            raise found.skip()
        if found.array.ndim != 3:
            raise Skip("weight_rank", f"W has {found.array.ndim} dimensions ({self.op_type} reads 3)")
        if found.array.shape[1] % self.gates:
            raise Skip("weight_rank", f"W's second dimension {found.array.shape[1]} is not {self.gates} gates")
        assert found.dtype is not None and value is not None  # the weight was found there
        return Target(node=node, weight=value, array=found.array, dtype=found.dtype,
                      view=RecurrentView(int(found.array.shape[0])), rule=self, context=context,
                      sources=found.sources)

    def schemes(self, target: Target) -> list[Scheme]:
        directions, width, inputs = target.array.shape  # width = gates·hidden
        # M = [W_0ᵀ | W_1ᵀ]: (input, directions·gates·hidden)
        matrix = np.transpose(target.array, (2, 0, 1)).reshape(inputs, directions * width)
        shape = static_shape(target.shapes, target.node.inputs[0])
        vectors = known_product(shape[:-1]) if shape else 1  # seq·batch, whichever the layout
        return [Scheme(
            name="input",
            matrices=matrix[None],
            params_before=directions * width * inputs,
            macs_before=vectors * directions * width * inputs,
            params_per_rank=inputs + directions * width,
            macs_per_rank=vectors * (inputs + directions * width),
            whiten_side=None,
        )]

    def activation(self, target: Target) -> Activation:
        raise NotImplementedError(f"{self.op_type} takes no calibration statistics (calibrated = False)")

    def factor_tensors(self, target: Target, scheme: Scheme, a: np.ndarray, b: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        # a: (input, r) is the MatMul's; b: (r, directions·gates·hidden) -> the new W (directions, gates·hidden, r).
        directions, width, _ = target.array.shape
        rank = b.shape[1]
        return a[0], b[0].reshape(rank, directions, width).transpose(1, 2, 0)

    def dense_weight(self, target: Target, scheme: Scheme, matrices: np.ndarray) -> np.ndarray:
        directions, width, inputs = target.array.shape
        return matrices[0].reshape(inputs, directions, width).transpose(1, 2, 0)

    def rewrite(self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator) -> list[ir.Node]:
        """MatMul(X, A), then the op on it with W = B; the op's every output replaces the old one's."""
        node = target.node
        base = node.name or self.op_type
        project = make_node("MatMul", [node.inputs[0], a], names(f"{base}_lr1"), names(f"{base}_lr_mid"))
        inputs = [project.outputs[0], b, *node.inputs[WEIGHT_INPUT + 1:]]
        outputs = [ir.Value(name=names(f"{base}_lr_out") if old.name else "") for old in node.outputs]
        attributes = [ir.convenience.convert_attribute(name, attr.value) for name, attr in node.attributes.items()]
        recurrent = ir.Node(node.domain, node.op_type, inputs=inputs, attributes=attributes, outputs=outputs,
                            name=names(f"{base}_lr2"), version=node.version)
        return [project, recurrent]


class LSTMRule(RecurrentRule):
    op_type = "LSTM"
    gates = 4


class GRURule(RecurrentRule):
    op_type = "GRU"
    gates = 3


class RNNRule(RecurrentRule):
    op_type = "RNN"
    gates = 1
