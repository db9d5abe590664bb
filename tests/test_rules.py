"""Unit tests of the factorization rules (passes/): match, schemes, activation, rewrite, factor tensors.

Every model is written inline in the ONNX text format, so each test shows its whole graph; weights
made with numpy are attached by name (`parse_text(text, W=array)`). The rewrite tests replace the node
with the rule's two nodes built from an exact full-rank factorization and compare onnxruntime's
outputs with the original's: at full rank the pair must compute the same function.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import assert_outputs_close, parse_text, run
from onnxlr.passes import (
    REASON_CODES,
    RULES,
    ConvRule,
    ConvView,
    GemmRule,
    GemmView,
    MatMulRule,
    MatMulView,
    NameGenerator,
    Skip,
)
from onnxlr.passes.base import Context, Scheme, Target

import onnxlr
from onnxlr.factorize import lowrank
from onnxlr.factorize.groups import WeightGroup
from onnxlr.factorize.svd import SvdCache
from onnxlr.factorize.targets import find_targets
from onnxlr.model_io.shapes import default_opset, infer_shapes
from onnxlr.settings import Settings

RNG_SEED = 0


# ----------------------------------------------------------------------------- helpers


def context_of(model: ir.Model) -> Context:
    return Context(shapes=infer_shapes(model), opset=default_opset(model))


def node_named(model: ir.Model, name: str) -> ir.Node:
    return next(node for node in model.graph if node.name == name)


def match(model: ir.Model, name: str) -> Target:
    """The target the node's rule makes of node `name`."""
    node = node_named(model, name)
    return RULES[node.op_type]().match(node, context_of(model))


def skip_code(model: ir.Model, name: str) -> str:
    with pytest.raises(Skip) as caught:
        match(model, name)
    assert caught.value.code in REASON_CODES
    return caught.value.code


def weights(seed: int = RNG_SEED, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def full_rank_pair(scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """An exact factorization of the scheme's matrices: A = U·S, B = Vt (full rank)."""
    decomposition = lowrank.svd(scheme.matrices)
    return decomposition.u * decomposition.s[:, None, :], decomposition.vt


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    array = np.ascontiguousarray(array.astype(dtype.numpy()))
    value = ir.Value(name=name, const_value=ir.Tensor(array, dtype=dtype, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(dtype))
    graph.register_initializer(value)
    return value


def rewrite_full_rank(model: ir.Model, target: Target, scheme: Scheme) -> tuple[list[ir.Node], np.ndarray, np.ndarray]:
    """Replace the target's node with the rule's pair from an exact full-rank factorization.

    Returns the new nodes and the two tensors they read (as the rule's factor_tensors made them).
    """
    a, b = full_rank_pair(scheme)
    first, second = target.rule.factor_tensors(target, scheme, a, b)
    names = NameGenerator(model)
    graph = target.node.graph
    first_value = _initializer(graph, names("lr_a"), first, target.dtype)
    second_value = _initializer(graph, names("lr_b"), second, target.dtype)
    new_nodes = target.rule.rewrite(target, scheme, first_value, second_value, names)
    node = target.node
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]],
                                            [new_nodes[-1].outputs[0]])
    return new_nodes, first, second


def scheme_named(target: Target, name: str) -> Scheme:
    return next(s for s in target.rule.schemes(target) if s.name == name)


def outputs(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    return run(ir.to_proto(model), feeds)


def attrs(node: ir.Node) -> dict:
    """A node's attributes as plain values (int lists as lists)."""
    return {k: list(a.value) if isinstance(a.value, (tuple, list)) else a.value for k, a in node.attributes.items()}


# ----------------------------------------------------------------------------- MatMul


def test_matmul_weight_on_the_right():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[5,3] x) => (float[5,4] y) {
            [mm] y = MatMul(x, W)
        }""", **weights(W=(3, 4)))
    target = match(model, "mm")
    node = node_named(model, "mm")
    assert isinstance(target.rule, MatMulRule) and target.view == MatMulView("right")
    assert target.weight is node.inputs[1] and target.weight_input == 1
    np.testing.assert_array_equal(target.array, model.graph.initializers["W"].const_value.numpy())
    assert target.dtype == ir.DataType.FLOAT
    (scheme,) = target.rule.schemes(target)
    assert scheme.name == "matmul" and scheme.whiten_side == "rows"
    assert scheme.matrices.shape == (1, 3, 4)
    # 5 rows of x, each a vector product with the 3x4 weight.
    assert (scheme.params_before, scheme.macs_before) == (12, 5 * 12)
    assert (scheme.params_per_rank, scheme.macs_per_rank) == (7, 5 * 7)
    activation = target.rule.activation(target)
    assert activation.value is node.inputs[0] and activation.layout == "rows"


def test_matmul_weight_on_the_left():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3,5] x) => (float[2,4,5] y) {
            [mm] y = MatMul(W, x)
        }""", **weights(W=(4, 3)))
    target = match(model, "mm")
    node = node_named(model, "mm")
    assert target.view == MatMulView("left")
    assert target.weight is node.inputs[0] and target.weight_input == 0
    (scheme,) = target.rule.schemes(target)
    assert scheme.name == "matmul" and scheme.whiten_side == "cols"
    assert scheme.matrices.shape == (1, 4, 3)
    # Every column of every batch element of x (2 x 5) is one product with the 4x3 weight.
    assert scheme.macs_before == 2 * 5 * 12
    activation = target.rule.activation(target)
    assert activation.value is node.inputs[1] and activation.layout == "cols"


def test_matmul_skips():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x, float[3,4] z, float[3,4] Win) => (float[3,5] y1, float[2,4] y2, float[2,4] y3,
                                                          float[2,4] y4, float[2,4] y5) {
            [both] y1 = MatMul(Wc, Wd)
            [runtime] y2 = MatMul(x, z)
            r = Relu(z)
            [computed] y3 = MatMul(x, r)
            [rank3] y4 = MatMul(x, W3)
            [input] y5 = MatMul(x, Win)
        }""", **weights(Wc=(3, 4), Wd=(4, 5), W3=(2, 3, 4), Win=(3, 4)))
    assert model.graph.initializers["Win"].is_graph_input()
    assert skip_code(model, "both") == "both_constant"
    assert skip_code(model, "runtime") == "runtime_weight"
    assert skip_code(model, "computed") == "runtime_weight"
    assert skip_code(model, "rank3") == "weight_rank"
    assert skip_code(model, "input") == "graph_input"


def test_matmul_weight_behind_identity_and_transpose_is_folded():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,4] y) {
            a = Identity(W0)
            b = Transpose <perm = [1, 0]> (a)
            c = Identity(b)
            [mm] y = MatMul(x, c)
        }""", **weights(W0=(4, 3)))
    target = match(model, "mm")
    assert target.view == MatMulView("right")
    assert target.weight is node_named(model, "mm").inputs[1]  # the chain's end: the node's own input
    np.testing.assert_array_equal(target.array, model.graph.initializers["W0"].const_value.numpy().T)
    assert target.rule.schemes(target)[0].matrices.shape == (1, 3, 4)


def test_matmul_constant_node_weight():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,2] y) {
            W = Constant <value = float[3,2] {1, 2, 3, 4, 5, 6}> ()
            [mm] y = MatMul(x, W)
        }""")
    target = match(model, "mm")
    assert target.view == MatMulView("right")
    np.testing.assert_array_equal(target.array, np.arange(1, 7, dtype=np.float32).reshape(3, 2))


@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_rewrite_is_exact_at_full_rank(side):
    text = {
        "right": """
            <ir_version: 10, opset_import: ["" : 17]>
            g (float[2,5,6] x) => (float[2,5,4] y) {
                [mm] y = MatMul(x, W)
            }""",
        "left": """
            <ir_version: 10, opset_import: ["" : 17]>
            g (float[2,6,5] x) => (float[2,4,5] y) {
                [mm] y = MatMul(W, x)
            }""",
    }[side]
    model = parse_text(text, **weights(W=(6, 4) if side == "right" else (4, 6)))
    x = np.random.default_rng(1).standard_normal((2, 5, 6) if side == "right" else (2, 6, 5)).astype(np.float32)
    reference = outputs(model, {"x": x})
    target = match(model, "mm")
    x_value = node_named(model, "mm").inputs[target.view.activation_index]
    (first, second), a, b = rewrite_full_rank(model, target, target.rule.schemes(target)[0])
    assert [first.op_type, second.op_type] == ["MatMul", "MatMul"]
    if side == "right":  # (x·A)·B
        assert first.inputs[0] is x_value and first.inputs[1].const_value is not None
        assert second.inputs[0] is first.outputs[0]
        assert (a.shape, b.shape) == ((6, 4), (4, 4))
    else:  # A·(B·x)
        assert first.inputs[1] is x_value and second.inputs[1] is first.outputs[0]
        assert (a.shape, b.shape) == ((4, 4), (4, 6))
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    assert_outputs_close(reference, outputs(model, {"x": x}))


# ----------------------------------------------------------------------------- Gemm


def test_gemm_operand_b_without_transpose():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[5,3] x) => (float[5,4] y) {
            [gemm] y = Gemm(x, W, c)
        }""", **weights(W=(3, 4), c=(4,)))
    target = match(model, "gemm")
    assert target.view == GemmView("B", False)
    (scheme,) = target.rule.schemes(target)
    assert scheme.name == "gemm" and scheme.whiten_side == "rows"
    np.testing.assert_array_equal(scheme.matrices[0], target.array)
    assert (scheme.params_before, scheme.fixed_params, scheme.macs_before) == (12 + 4, 4, 5 * 12)
    activation = target.rule.activation(target)
    assert activation.value is node_named(model, "gemm").inputs[0] and activation.layout == "rows"


def test_gemm_operand_b_transposed_and_transposed_activation():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[3,5] x) => (float[5,4] y) {
            [gemm] y = Gemm <transA = 1, transB = 1> (x, W)
        }""", **weights(W=(4, 3)))
    target = match(model, "gemm")
    assert target.view == GemmView("B", True)
    (scheme,) = target.rule.schemes(target)
    # The effective matrix op(B) = W^T: (K, N) = (3, 4).
    assert scheme.matrices.shape == (1, 3, 4)
    np.testing.assert_array_equal(scheme.matrices[0], target.array.T)
    assert scheme.whiten_side == "rows" and scheme.macs_before == 5 * 12
    # op(A) = x^T: its rows are x's columns.
    assert target.rule.activation(target).layout == "cols"


@pytest.mark.parametrize("trans_b, layout", [(0, "cols"), (1, "rows")])
def test_gemm_operand_a_transposed(trans_b, layout):
    x_shape = "4,6" if trans_b else "6,4"
    model = parse_text(f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[{x_shape}] x) => (float[5,4] y) {{
            [gemm] y = Gemm <transA = 1, transB = {trans_b}> (W, x)
        }}""", **weights(W=(6, 5)))
    target = match(model, "gemm")
    node = node_named(model, "gemm")
    assert target.view == GemmView("A", True)
    assert target.weight is node.inputs[0]
    (scheme,) = target.rule.schemes(target)
    # op(A) = W^T: (M, K) = (5, 6); the activation's columns (op(B)'s) enter it: "cols".
    assert scheme.matrices.shape == (1, 5, 6) and scheme.whiten_side == "cols"
    np.testing.assert_array_equal(scheme.matrices[0], target.array.T)
    assert scheme.macs_before == 4 * 30
    activation = target.rule.activation(target)
    assert activation.value is node.inputs[1] and activation.layout == layout


def test_gemm_skips():
    old = parse_text("""
        <ir_version: 10, opset_import: ["" : 6]>
        g (float[2,3] x) => (float[2,4] y) {
            [gemm] y = Gemm(x, W, c)
        }""", **weights(W=(3, 4), c=(4,)))
    assert skip_code(old, "gemm") == "old_opset"
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x, float[3,4] z) => (float[3,5] y1, float[2,4] y2) {
            [both] y1 = Gemm(A, B)
            [runtime] y2 = Gemm(x, z)
        }""", **weights(A=(3, 4), B=(4, 5)))
    assert skip_code(model, "both") == "both_constant"
    assert skip_code(model, "runtime") == "runtime_weight"


def test_gemm_rewrite_nodes_for_operand_b():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[3,5] x) => (float[5,4] y) {
            [gemm] y = Gemm <transA = 1, transB = 1, alpha = 0.5, beta = 2.0> (x, W, c)
        }""", **weights(W=(4, 3), c=(5, 4)))
    node = node_named(model, "gemm")
    x, c = node.inputs[0], node.inputs[2]
    target = match(model, "gemm")
    (first, second), p, q = rewrite_full_rank(model, target, target.rule.schemes(target)[0])
    assert [first.op_type, second.op_type] == ["Gemm", "Gemm"]
    # alpha·(x^T·P)·Q + beta·C with both factors stored transposed, like the weight.
    assert first.inputs[0] is x and len(first.inputs) == 2
    assert attrs(first) == {"transA": 1, "transB": 1}
    assert second.inputs[0] is first.outputs[0] and second.inputs[2] is c
    assert attrs(second) == {"transB": 1, "alpha": 0.5, "beta": 2.0}
    # op(B) = W^T (3, 4) = P·Q with P (3, r), Q (r, 4), stored as P^T (r, 3) and Q^T (4, r): W = Q^T·P^T.
    assert (p.shape, q.shape) == ((3, 3), (4, 3))
    np.testing.assert_allclose(q @ p, target.array, atol=1e-5)


def test_gemm_rewrite_nodes_for_operand_a():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4,6] x) => (float[5,4] y) {
            [gemm] y = Gemm <transA = 1, transB = 1, alpha = 3.0> (W, x, c)
        }""", **weights(W=(6, 5), c=(5, 1)))
    node = node_named(model, "gemm")
    x, c = node.inputs[1], node.inputs[2]
    target = match(model, "gemm")
    (first, second), _, _ = rewrite_full_rank(model, target, target.rule.schemes(target)[0])
    # alpha·P·(Q·x^T) + beta·C
    assert first.inputs[1] is x and len(first.inputs) == 2
    assert attrs(first) == {"transA": 1, "transB": 1}
    assert second.inputs[1] is first.outputs[0] and second.inputs[2] is c
    assert attrs(second) == {"transA": 1, "alpha": 3.0}


def test_gemm_rewrite_before_opset_11_gives_the_first_gemm_a_zero_bias():
    model = parse_text("""
        <ir_version: 7, opset_import: ["" : 9]>
        g (float[2,3] x) => (float[2,4] y) {
            [gemm] y = Gemm(x, W, c)
        }""", **weights(W=(3, 4), c=(4,)))
    c = node_named(model, "gemm").inputs[2]
    target = match(model, "gemm")
    (first, second), _, _ = rewrite_full_rank(model, target, target.rule.schemes(target)[0])
    assert len(first.inputs) == 3
    zero = first.inputs[2].const_value.numpy()
    assert zero.shape == (1,) and not zero.any()
    assert second.inputs[2] is c


GEMM_CASES = {
    # name: (text, weights, x shape)
    "B": ("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[5,6] x) => (float[5,4] y) {
            y = Gemm(x, W)
        }""", {"W": (6, 4)}, (5, 6)),
    "B-transposed-row-bias": ("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[6,5] x) => (float[5,4] y) {
            y = Gemm <transA = 1, transB = 1, alpha = 0.5, beta = 2.0> (x, W, c)
        }""", {"W": (4, 6), "c": (4,)}, (6, 5)),
    "A-transposed-column-bias": ("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[6,4] x) => (float[5,4] y) {
            y = Gemm <transA = 1, beta = 0.25> (W, x, c)
        }""", {"W": (6, 5), "c": (5, 1)}, (6, 4)),
    "A-scalar-bias": ("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4,6] x) => (float[5,4] y) {
            y = Gemm <transB = 1, alpha = -1.5> (W, x, c)
        }""", {"W": (5, 6), "c": (1,)}, (4, 6)),
    "B-opset-9": ("""
        <ir_version: 7, opset_import: ["" : 9]>
        g (float[5,6] x) => (float[5,4] y) {
            y = Gemm <transB = 1> (x, W, c)
        }""", {"W": (4, 6), "c": (5, 4)}, (5, 6)),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_rewrite_is_exact_at_full_rank(case):
    text, shapes, x_shape = GEMM_CASES[case]
    model = parse_text(text, **weights(**shapes))
    x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)
    reference = outputs(model, {"x": x})
    (node,) = list(model.graph)
    target = GemmRule().match(node, context_of(model))
    new_nodes, _, _ = rewrite_full_rank(model, target, target.rule.schemes(target)[0])
    assert [n.op_type for n in new_nodes] == ["Gemm", "Gemm"]
    assert_outputs_close(reference, outputs(model, {"x": x}))


def test_gemm_pipeline_at_full_rank_is_exact():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[6,5] x) => (float[3,5] y) {
            [g1] h = Gemm <transA = 1, transB = 1, alpha = 0.5> (x, W1, c1)
            [g2] y = Gemm <transA = 1, transB = 1, beta = 3.0> (W2, h, c2)
        }""", **weights(W1=(4, 6), c1=(4,), W2=(4, 3), c2=(3, 1)))
    x = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    reference = outputs(model, {"x": x})
    new_model, report = onnxlr.optimize(model, rank_ratio=1, allow_no_gain=True, ops=("Gemm",), verify=False)
    assert [n.op_type for n in new_model.graph] == ["Gemm"] * 4
    assert_outputs_close(reference, outputs(new_model, {"x": x}))


# ----------------------------------------------------------------------------- Conv


def test_conv_schemes_and_activation():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,4,8,8] x) => (float[1,6,4,9] y) {
            [conv] y = Conv <strides = [2, 1], dilations = [1, 2], pads = [1, 2, 1, 3]> (x, K, b)
        }""", **weights(K=(6, 4, 3, 3), b=(6,)))
    target = match(model, "conv")
    assert isinstance(target.rule, ConvRule) and target.view == ConvView(1)
    schemes = {s.name: s for s in target.rule.schemes(target)}
    assert list(schemes) == ["output", "input", "spatial"]
    assert {name: s.whiten_side for name, s in schemes.items()} == {"output": "cols", "input": None, "spatial": None}
    assert schemes["output"].matrices.shape == (1, 6, 4 * 9)
    assert schemes["input"].matrices.shape == (1, 6 * 9, 4)
    assert schemes["spatial"].matrices.shape == (1, 4 * 3, 6 * 3)
    for scheme in schemes.values():
        assert scheme.params_before == 6 * 4 * 9 + 6 and scheme.fixed_params == 6
        assert scheme.macs_before == 4 * 9 * 6 * 4 * 9  # output positions x Cout x Cin x K
    assert schemes["output"].params_per_rank == 4 * 9 + 6
    assert schemes["spatial"].params_per_rank == 4 * 3 + 6 * 3
    activation = target.rule.activation(target)
    assert activation.value is node_named(model, "conv").inputs[0]
    assert activation.layout == "patches" and activation.groups == 1
    assert {k: list(v) for k, v in activation.patches.items()} == {
        "kernel_shape": [3, 3], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 1, 3]}


def test_conv_grouped_1d_and_auto_pad():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,4,8,8] x, float[1,4,10] s) => (float[1,6,8,8] y, float[1,6,10] z) {
            [grouped] y = Conv <group = 2, auto_pad = "SAME_UPPER"> (x, K)
            [conv1d] z = Conv (s, K1)
        }""", **weights(K=(6, 2, 3, 3), K1=(6, 4, 3)))
    grouped = match(model, "grouped")
    assert grouped.view == ConvView(2)
    schemes = {s.name: s for s in grouped.rule.schemes(grouped)}
    assert schemes["output"].matrices.shape == (2, 3, 2 * 9)
    assert schemes["spatial"].matrices.shape == (2, 2 * 3, 3 * 3)
    activation = grouped.rule.activation(grouped)
    assert activation.groups == 2 and activation.patches == {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"}
    conv1d = match(model, "conv1d")
    assert [s.name for s in conv1d.rule.schemes(conv1d)] == ["output", "input"]  # spatial is for 2-D kernels


def test_conv_skips():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,4,8,8] x, float[6,4,3,3] Kin) => (float[1,4,6,6] y1, float[1,6,6,6] y2, float[1,6,6,6] y3) {
            [depthwise] y1 = Conv <group = 4> (x, Kd)
            [bad_group] y2 = Conv <group = 4> (x, Kb)
            [runtime] y3 = Conv (x, Kin)
        }""", **weights(Kd=(4, 1, 3, 3), Kb=(6, 2, 3, 3)))
    assert skip_code(model, "depthwise") == "depthwise"
    assert skip_code(model, "bad_group") == "bad_group"
    assert skip_code(model, "runtime") == "runtime_weight"


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("scheme_name", ["output", "input", "spatial"])
def test_conv_dense_weight_round_trip(scheme_name, groups):
    model = parse_text(f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,4,8,8] x) => (float[1,6,6,4] y) {{
            [conv] y = Conv <group = {groups}, kernel_shape = [3, 5]> (x, K)
        }}""", **weights(K=(6, 4 // groups, 3, 5)))
    target = match(model, "conv")
    scheme = scheme_named(target, scheme_name)
    np.testing.assert_array_equal(target.rule.dense_weight(target, scheme, scheme.matrices), target.array)
    a, b = full_rank_pair(scheme)
    dense = target.rule.dense_weight(target, scheme, np.matmul(a, b))
    assert dense.shape == target.array.shape
    np.testing.assert_allclose(dense, target.array, atol=1e-5)
    # The group's WeightGroup takes the same path (balanced factors U·sqrt(S), sqrt(S)·Vt).
    group = WeightGroup.of([target])
    np.testing.assert_allclose(SvdCache().dense_weight(group, scheme, scheme.full_rank), target.array, atol=1e-5)


CONV_TEXT = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[1,4,9,10] x) => (float[1,6,5,8] y) {
        [conv] y = Conv <strides = [2, 1], dilations = [1, 2], pads = [1, 2, 1, 0], group = GROUP> (x, K, b)
    }"""


def test_conv_rewrite_attributes_per_scheme():
    expected = {
        "output": ({"kernel_shape": [3, 3], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 1, 0], "group": 1},
                   {"kernel_shape": [1, 1], "group": 1}),
        "input": ({"kernel_shape": [1, 1], "group": 1},
                  {"kernel_shape": [3, 3], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 1, 0], "group": 1}),
        "spatial": ({"kernel_shape": [3, 1], "strides": [2, 1], "dilations": [1, 1], "pads": [1, 0, 1, 0], "group": 1},
                    {"kernel_shape": [1, 3], "strides": [1, 1], "dilations": [1, 2], "pads": [0, 2, 0, 0], "group": 1}),
    }
    kernel_shapes = {  # (first, second) at full rank r: output r=6, input r=4, spatial r=min(4*3, 6*3)=12
        "output": ((6, 4, 3, 3), (6, 6, 1, 1)),
        "input": ((4, 4, 1, 1), (6, 4, 3, 3)),
        "spatial": ((12, 4, 3, 1), (6, 12, 1, 3)),
    }
    for name, (first_attrs, second_attrs) in expected.items():
        model = parse_text(CONV_TEXT.replace("GROUP", "1"), **weights(K=(6, 4, 3, 3), b=(6,)))
        node = node_named(model, "conv")
        x, bias = node.inputs[0], node.inputs[2]
        target = match(model, "conv")
        (first, second), k1, k2 = rewrite_full_rank(model, target, scheme_named(target, name))
        assert attrs(first) == first_attrs, name
        assert attrs(second) == second_attrs, name
        assert (k1.shape, k2.shape) == kernel_shapes[name], name
        assert first.inputs[0] is x and len(first.inputs) == 2, name  # the bias goes on the second conv only
        assert second.inputs[0] is first.outputs[0] and second.inputs[2] is bias, name


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("scheme_name", ["output", "input", "spatial"])
def test_conv_rewrite_is_exact_at_full_rank(scheme_name, groups):
    model = parse_text(CONV_TEXT.replace("GROUP", str(groups)), **weights(K=(6, 4 // groups, 3, 3), b=(6,)))
    x = np.random.default_rng(4).standard_normal((1, 4, 9, 10)).astype(np.float32)
    reference = outputs(model, {"x": x})
    target = match(model, "conv")
    rewrite_full_rank(model, target, scheme_named(target, scheme_name))
    assert [n.op_type for n in model.graph] == ["Conv", "Conv"]
    assert_outputs_close(reference, outputs(model, {"x": x}))


@pytest.mark.parametrize("scheme_name", ["output", "input", "spatial"])
def test_conv_rewrite_with_auto_pad_is_exact(scheme_name):
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1,4,9,10] x) => (float[1,6,5,5] y) {
            [conv] y = Conv <strides = [2, 2], auto_pad = "SAME_UPPER"> (x, K)
        }""", **weights(K=(6, 4, 3, 3)))
    x = np.random.default_rng(5).standard_normal((1, 4, 9, 10)).astype(np.float32)
    reference = outputs(model, {"x": x})
    target = match(model, "conv")
    (first, second), _, _ = rewrite_full_rank(model, target, scheme_named(target, scheme_name))
    pointwise = {"output": second, "input": first}.get(scheme_name)
    for node in (first, second):
        if node is not pointwise:
            assert attrs(node)["auto_pad"] == "SAME_UPPER" and "pads" not in attrs(node)
    assert_outputs_close(reference, outputs(model, {"x": x}))


# ----------------------------------------------------------------------------- targets


def find(model: ir.Model, **settings):
    return find_targets(model, Settings.of(**settings), context_of(model))


def skipped_codes(found) -> dict[str, str]:
    return {s.node.name: s.code for s in found.skipped}


def test_shared_weight_read_the_same_way_is_one_group():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x, float[5,3] z) => (float[2,4] y1, float[5,4] y2) {
            [mm1] y1 = MatMul(x, W)
            [mm2] y2 = MatMul(z, W)
        }""", **weights(W=(3, 4)))
    found = find(model)
    assert found.skipped == []
    (group,) = found.groups
    assert [t.node.name for t in group.targets] == ["mm1", "mm2"]
    assert group.targets[0].weight is group.targets[1].weight is model.graph.initializers["W"]
    assert group.excluded is None


def test_shared_weight_read_in_other_views_shares_one_pair():
    """X·W and W·Z factorize the same matrix; Gemm(v, S) and Gemm<transB>(v, S) see S and its transpose."""
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x, float[3,5] z, float[4,3] v) => (float[2,3] y1, float[3,5] y2, float[4,3] y3,
                                                        float[4,3] y4) {
            [right] y1 = MatMul(x, W)
            [left] y2 = MatMul(W, z)
            [plain] y3 = Gemm(v, S)
            [transposed] y4 = Gemm <transB = 1> (v, S)
        }""", **weights(W=(3, 3), S=(3, 3)))
    found = find(model)
    assert found.skipped == []
    by_lead = {g.lead.node.name: g for g in found.groups}
    assert [t.node.name for t in by_lead["right"].targets] == ["right", "left"]
    assert by_lead["right"].flipped == [False, False]
    assert [t.node.name for t in by_lead["plain"].targets] == ["plain", "transposed"]
    assert by_lead["plain"].flipped == [False, True]


def test_shared_weight_read_through_a_reshape_is_skipped():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,4] x, float[2,6] z) => (float[2,6] y1, float[2,4] y2) {
            shape = Constant <value = int64[2] {6, 4}> ()
            R = Reshape(W, shape)
            [direct] y1 = MatMul(x, W)
            [reshaped] y2 = MatMul(z, R)
        }""", **weights(W=(4, 6)))
    found = find(model)
    assert found.groups == []
    assert skipped_codes(found) == {"direct": "shared_differently", "reshaped": "shared_differently"}


def test_weight_also_read_by_another_op_is_skipped():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,4] y, float[3,4] s) {
            [mm] y = MatMul(x, W)
            [add] s = Add(W, W)
        }""", **weights(W=(3, 4)))
    found = find(model)
    assert found.groups == []
    assert skipped_codes(found) == {"mm": "shared_with_other_op"}


def test_include_and_exclude():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,4] y1, float[2,4] y2, float[2,4] y3) {
            [enc_0] y1 = MatMul(x, W1)
            [enc_1] y2 = MatMul(x, W2)
            [head] y3 = MatMul(x, W3)
        }""", **weights(W1=(3, 4), W2=(3, 4), W3=(3, 4)))
    included = find(model, include=("enc_*",))
    assert [g.lead.node.name for g in included.groups] == ["enc_0", "enc_1"]
    assert skipped_codes(included) == {"head": "not_included"}
    excluded = find(model, exclude=("enc_1",))
    assert [g.lead.node.name for g in excluded.groups] == ["enc_0", "head"]
    assert skipped_codes(excluded) == {"enc_1": "excluded"}


def test_every_code_emitted_is_a_reason_code():
    model = parse_text("""
        <ir_version: 10, opset_import: ["" : 17, "com.custom" : 1]>
        g (float[2,3] x, int32[2,3] xi, float[3,4] Win, int64[2] shape, float[1,4,8,8] img, float[3,4] z)
          => (float[2,4] y1, int32[2,4] y2, float[2,4] y3, float[2,0] y4, float[1,4,10,10] y5, int32[2,4] y6,
              float[2,4] y7, float[2,4] y8, float[2,4] y9, int32[2,4] y10, float[2,4] y11, float[3,4] Wout,
              float[2,4] y12, float[2,4] y13, float[3,5] y14, float[2,4] y15, float[2,4] y16, float[1,4,6,6] y17,
              float[1,6,6,6] y18, float[2,4] y19) {
            [graph_input] y1 = MatMul(x, Win)
            [dtype] y2 = MatMul(xi, Wint)
            [nan] y3 = MatMul(x, Wnan)
            [empty] y4 = MatMul(x, Wempty)
            [convT] y5 = ConvTranspose(img, Kt)
            [mmint] y6 = MatMulInteger(xi, Wint2)
            deq = DequantizeLinear(Wq, scale)
            [quantized] y7 = MatMul(x, deq)
            custom = com.custom.Foo(Wc)
            [custom] y8 = MatMul(x, custom)
            reshaped = Reshape(Wr, shape)
            [reshape] y9 = MatMul(x, reshaped)
            cast = Cast <to = 6> (Wf)
            [cast] y10 = MatMul(xi, cast)
            [output] y11 = MatMul(x, Wout)
            [runtime] y12 = MatMul(x, z)
            [rank3] y13 = MatMul(x, W3)
            [both] y14 = MatMul(Wa, Wb)
            [shared] y15 = MatMul(x, Ws)
            sum = Add(Ws, Ws)
            [small] y16 = MatMul(x, Wsmall)
            [depthwise] y17 = Conv <group = 4> (img, Kd)
            [bad_group] y18 = Conv <group = 4> (img, Kb)
            [ok] y19 = Gemm(x, Wok)
            [dense_sum] y20 = Mul(sum, sum)
        }""",
        Win=np.ones((3, 4), np.float32), Wint=np.ones((3, 4), np.int32),
        Wnan=np.full((3, 4), np.nan, np.float32), Wempty=np.ones((3, 0), np.float32),
        Kt=np.ones((4, 4, 3, 3), np.float32), Wint2=np.ones((3, 4), np.int32),
        Wq=np.ones((3, 4), np.int8), scale=np.ones((), np.float32), Wc=np.ones((3, 4), np.float32),
        Wr=np.ones((12,), np.float32), Wf=np.ones((3, 4), np.float32), Wout=np.ones((3, 4), np.float32),
        W3=np.ones((2, 3, 4), np.float32), Wa=np.ones((3, 4), np.float32), Wb=np.ones((4, 5), np.float32),
        Ws=np.ones((3, 4), np.float32), Wsmall=np.ones((3, 4), np.float32), Kd=np.ones((4, 1, 3, 3), np.float32),
        Kb=np.ones((6, 2, 3, 3), np.float32), Wok=np.ones((3, 4), np.float32) * np.arange(4, dtype=np.float32))
    found = find(model, min_params=1)
    expected = {
        "graph_input": "graph_input", "dtype": "dtype", "nan": "non_finite_weight", "empty": "empty_weight",
        "convT": "unsupported_op", "mmint": "quantized_op", "quantized": "quantized_weight",
        "custom": "custom_op_weight", "reshape": "runtime_reshape", "cast": "non_float_cast", "output": "graph_output",
        "runtime": "runtime_weight", "rank3": "weight_rank", "both": "both_constant", "shared": "shared_with_other_op",
        "depthwise": "depthwise", "bad_group": "bad_group",
    }
    assert skipped_codes(found) == expected
    assert set(expected.values()) <= set(REASON_CODES)
    assert sorted(g.lead.node.name for g in found.groups) == ["ok", "small"]
    # --min-params keeps a group dense with a code of its own.
    small = find(model, min_params=13)
    codes = {g.lead.node.name: g.excluded[0] for g in small.groups if g.excluded}
    assert codes == {"small": "min_params", "ok": "min_params"}
    assert set(codes.values()) <= set(REASON_CODES)
