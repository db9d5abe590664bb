"""onnxlr.pairs: coupled MLP pairs (two linear layers joined by an elementwise activation)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from graphs import init, make_model, run, tensor_input
from onnx import TensorProto, helper

from onnxlr.pairs import find_mlp_pairs

IN, D, OUT = 4, 8, 3
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((IN, D)).astype(np.float32)
B1 = RNG.standard_normal(D).astype(np.float32)
W2 = RNG.standard_normal((D, OUT)).astype(np.float32)
B2 = RNG.standard_normal(OUT).astype(np.float32)
W3 = RNG.standard_normal((IN, D)).astype(np.float32)
X = RNG.standard_normal((2, IN)).astype(np.float32)
MINILM = Path(__file__).resolve().parent.parent / ".cache" / "models" / "minilm" / "model.onnx"


def const(name, value):
    """A Constant node holding a float32 scalar (as PyTorch exports them)."""
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]),
                            name=name)


def activation(kind, source="h", target="a", prefix=""):
    """Nodes computing target = f(source), f one of the activations exporters write."""
    p = prefix
    if kind == "relu":
        return [helper.make_node("Relu", [source], [target], name=p + "relu")]
    if kind == "gelu":
        return [helper.make_node("Gelu", [source], [target], name=p + "gelu")]
    if kind == "erf":  # PyTorch's exact Gelu: x * 0.5 * (1 + erf(x / sqrt 2)), as exported
        return [const(p + "sqrt2", 1.4142135), helper.make_node("Div", [source, p + "sqrt2"], [p + "d"], name=p + "Div"),
                helper.make_node("Erf", [p + "d"], [p + "e"], name=p + "Erf"), const(p + "one", 1.0),
                helper.make_node("Add", [p + "e", p + "one"], [p + "e1"], name=p + "Add"),
                helper.make_node("Mul", [source, p + "e1"], [p + "m"], name=p + "Mul"), const(p + "half", 0.5),
                helper.make_node("Mul", [p + "m", p + "half"], [target], name=p + "Mul_1")]
    if kind == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return [const(p + "three", 3.0), helper.make_node("Pow", [source, p + "three"], [p + "cube"], name=p + "Pow"),
                const(p + "k", 0.044715), helper.make_node("Mul", [p + "cube", p + "k"], [p + "kc"], name=p + "Mul"),
                helper.make_node("Add", [source, p + "kc"], [p + "inner"], name=p + "Add"),
                const(p + "s", 0.7978845608), helper.make_node("Mul", [p + "inner", p + "s"], [p + "si"], name=p + "Mul_1"),
                helper.make_node("Tanh", [p + "si"], [p + "t"], name=p + "Tanh"), const(p + "one", 1.0),
                helper.make_node("Add", [p + "t", p + "one"], [p + "t1"], name=p + "Add_1"),
                helper.make_node("Mul", [source, p + "t1"], [p + "m"], name=p + "Mul_2"), const(p + "half", 0.5),
                helper.make_node("Mul", [p + "m", p + "half"], [target], name=p + "Mul_3")]
    if kind == "silu":
        return [helper.make_node("Sigmoid", [source], [p + "sig"], name=p + "Sigmoid"),
                helper.make_node("Mul", [source, p + "sig"], [target], name=p + "Mul")]
    if kind == "relu6":
        return [const(p + "lo", 0.0), const(p + "hi", 6.0),
                helper.make_node("Clip", [source, p + "lo", p + "hi"], [target], name=p + "Clip")]
    if kind == "hardswish":
        return [helper.make_node("HardSwish", [source], [target], name=p + "HardSwish")]
    raise ValueError(kind)


def matmul_mlp(kind="relu", bias=True, extra_nodes=(), extra_outputs=(), extra_inits=(), opset=17):
    """x -> MatMul W1 [+ b1] -> f -> MatMul W2 [+ b2] -> y."""
    up_out, down_out = ("h0", "y0") if bias else ("h", "y")
    nodes = [helper.make_node("MatMul", ["x", "W1"], [up_out], name="up")]
    if bias:
        nodes.append(helper.make_node("Add", ["b1", "h0"], ["h"], name="up_bias"))  # bias first, as PyTorch writes it
    nodes += activation(kind)
    nodes.append(helper.make_node("MatMul", ["a", "W2"], [down_out], name="down"))
    if bias:
        nodes.append(helper.make_node("Add", ["y0", "b2"], ["y"], name="down_bias"))
    inits = [init("W1", W1), init("W2", W2)] + ([init("b1", B1), init("b2", B2)] if bias else [])
    outputs = [tensor_input("y", None)] + [tensor_input(name, None) for name in extra_outputs]
    proto = make_model(nodes + list(extra_nodes), [tensor_input("x", [2, IN])], outputs,
                       inits + list(extra_inits), opset=opset)
    return proto, ir.serde.deserialize_model(proto)


def gemm_mlp(kind="gelu", alpha=1.0, opset=20):
    """x -> Gemm(W1 stored (D, IN), b1, transB=1) -> f -> Gemm(W2, b2) -> y."""
    nodes = [helper.make_node("Gemm", ["x", "W1t", "b1"], ["h"], name="up", transB=1, alpha=alpha),
             *activation(kind), helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="down")]
    inits = [init("W1t", W1.T.copy()), init("b1", B1), init("W2", W2), init("b2", B2)]
    proto = make_model(nodes, [tensor_input("x", [2, IN])], [tensor_input("y", None)], inits, opset=opset)
    return proto, ir.serde.deserialize_model(proto)


def only_pair(model):
    pairs, rejected = find_mlp_pairs(model)
    assert rejected == []
    assert len(pairs) == 1
    return pairs[0]


def no_pair(model, reason):
    pairs, rejected = find_mlp_pairs(model)
    assert pairs == []
    assert [(node.name, reason in why) for node, why in rejected] == [("up", True)], rejected
    return rejected[0][1]


@pytest.mark.parametrize("kind", ["relu", "erf", "tanh", "silu", "relu6", "hardswish"])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_pairs(kind, bias):
    proto, model = matmul_mlp(kind, bias=bias)
    pair = only_pair(model)
    assert (pair.up.node.name, pair.down.node.name, pair.width) == ("up", "down", D)
    assert pair.activation.name == "a"
    assert pair.activation is pair.down.node.inputs[0]
    np.testing.assert_array_equal(pair.up.matrix(), W1)
    np.testing.assert_array_equal(pair.down.matrix(), W2)
    assert not pair.up.transposed and not pair.down.transposed
    if bias:
        assert (pair.up.bias.name, pair.up.bias_node.name, pair.up.output.name) == ("b1", "up_bias", "h")
        assert (pair.down.bias.name, pair.down.bias_node.name, pair.down.output.name) == ("b2", "down_bias", "y")
        np.testing.assert_array_equal(pair.up.bias_array(), B1)
        np.testing.assert_array_equal(pair.down.bias_array(), B2)
    else:
        assert pair.up.bias is pair.up.bias_node is pair.down.bias is pair.down.bias_node is None
        assert pair.up.bias_array() is None and pair.up.output.name == "h"


def test_gemm_gelu_pair_and_its_matrices():
    proto, model = gemm_mlp("gelu")
    pair = only_pair(model)
    assert pair.up.transposed and not pair.down.transposed and pair.width == D
    assert pair.up.bias.name == "b1" and pair.up.bias_node is None and pair.up.output.name == "h"
    assert pair.up.matrix().shape == (IN, D)
    # The pair's arrays rebuild the graph's output: matrix() is X·W, bias_array() is (out,).
    pre = X @ pair.up.matrix() + pair.up.bias_array()
    gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    expected = gelu @ pair.down.matrix() + pair.down.bias_array()
    reference, = run(proto, {"x": X})
    np.testing.assert_allclose(expected, reference, rtol=1e-3, atol=1e-3)


def test_slicing_the_neurons_of_a_pair_keeps_their_contribution():
    """What the pair promises: the output is a sum over the D neurons of up column j, f, down row j."""
    proto, model = matmul_mlp("erf")
    pair = only_pair(model)
    keep = [1, 2, 5]
    pre = X @ pair.up.matrix()[:, keep] + pair.up.bias_array()[keep]
    act = pre * 0.5 * (1 + np.vectorize(math.erf)(pre / np.sqrt(2)))
    sliced = act @ pair.down.matrix()[keep] + pair.down.bias_array()
    mask = np.zeros(D, dtype=bool)
    mask[keep] = True
    pre_full = X @ pair.up.matrix() + pair.up.bias_array()
    act_full = pre_full * 0.5 * (1 + np.vectorize(math.erf)(pre_full / np.sqrt(2)))
    np.testing.assert_allclose(sliced, (act_full * mask) @ pair.down.matrix() + pair.down.bias_array(), rtol=1e-5)


def test_intermediate_graph_output_is_not_a_pair():
    _, model = matmul_mlp("relu", extra_outputs=["a"])
    no_pair(model, "graph output")


def test_pre_activation_read_elsewhere_is_not_a_pair():
    side = helper.make_node("Softmax", ["h"], ["side"], name="side")
    _, model = matmul_mlp("silu", extra_nodes=[side], extra_outputs=["side"])
    assert no_pair(model, "also read by") == "intermediate is also read by Softmax node 'side'"


def test_activation_read_by_a_second_linear_is_not_a_pair():
    other = helper.make_node("MatMul", ["a", "W4"], ["z"], name="other")
    _, model = matmul_mlp("relu", extra_nodes=[other], extra_outputs=["z"], extra_inits=[init("W4", W2.copy())])
    no_pair(model, "also read by MatMul node")


def test_weight_read_by_two_nodes_is_not_a_pair():
    other = helper.make_node("MatMul", ["x", "W1"], ["z"], name="other")
    _, model = matmul_mlp("relu", extra_nodes=[other], extra_outputs=["z"])
    no_pair(model, "weight 'W1' is also read by another node")


def test_down_weight_read_by_two_nodes_is_not_a_pair():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"), *activation("relu"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down"),
             helper.make_node("MatMul", ["x2", "W2"], ["z"], name="other")]
    proto = make_model(nodes, [tensor_input("x", [2, IN]), tensor_input("x2", [2, D])],
                       [tensor_input("y", None), tensor_input("z", None)], [init("W1", W1), init("W2", W2)])
    no_pair(ir.serde.deserialize_model(proto), "down MatMul node 'down': weight 'W2' is also read by another node")


def test_non_scalar_constant_in_the_region_is_not_a_pair():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Mul", ["r", "scale"], ["a"], name="scale"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    inits = [init("W1", W1), init("W2", W2), init("scale", np.full(D, 0.5, np.float32))]
    proto = make_model(nodes, [tensor_input("x", [2, IN])], [tensor_input("y", None)], inits)
    no_pair(ir.serde.deserialize_model(proto), "read by Mul node 'scale', not a linear layer")


@pytest.mark.parametrize("second", [None, "relu"])
def test_gated_mlp_is_not_a_pair(second):
    """gelu(x·W1) * (x·W3) (or * relu(x·W3)), then ·W2: two up-projections, out of scope."""
    gate_out = "g2" if second else "h2"
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"), *activation("silu", target="g1"),
             helper.make_node("MatMul", ["x", "W3"], ["h2"], name="up2"),
             *(activation(second, source="h2", target="g2", prefix="b_") if second else []),
             helper.make_node("Mul", ["g1", gate_out], ["a"], name="gate"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    inits = [init("W1", W1), init("W2", W2), init("W3", W3)]
    proto = make_model(nodes, [tensor_input("x", [2, IN])], [tensor_input("y", None)], inits)
    pairs, rejected = find_mlp_pairs(ir.serde.deserialize_model(proto))
    assert pairs == []
    assert [node.name for node, _ in rejected] == (["up", "up2"] if second else ["up"])
    assert all("Mul node 'gate'" in why for _, why in rejected)


def test_two_linears_without_activation_are_skipped_silently():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="up"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="up_bias"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="down")]
    proto = make_model(nodes, [tensor_input("x", [2, IN])], [tensor_input("y", None)],
                       [init("W1", W1), init("b1", B1), init("W2", W2)])
    assert find_mlp_pairs(ir.serde.deserialize_model(proto)) == ([], [])


def test_gemm_alpha_is_not_a_pair():
    _, model = gemm_mlp("relu", alpha=2.0, opset=17)
    no_pair(model, "alpha")


def test_cast_to_an_integer_ends_the_region():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Cast", ["r"], ["c"], name="cast", to=TensorProto.INT32),
             helper.make_node("Cast", ["c"], ["a"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    proto = make_model(nodes, [tensor_input("x", [2, IN])], [tensor_input("y", None)], [init("W1", W1), init("W2", W2)])
    no_pair(ir.serde.deserialize_model(proto), "read by Cast node 'cast'")


def test_minilm_export_has_one_pair_a_layer():
    if not MINILM.exists():
        pytest.skip(f"{MINILM} is missing")
    pairs, rejected = find_mlp_pairs(ir.load(MINILM))
    assert rejected == []
    assert [(p.up.node.name, p.down.node.name) for p in pairs] == [
        (f"/bert/encoder/layer.{i}/intermediate/dense/MatMul", f"/bert/encoder/layer.{i}/output/dense/MatMul")
        for i in range(6)]
    for pair in pairs:
        assert pair.up.bias_node.op_type == "Add" and pair.down.bias_node.op_type == "Add"
        assert pair.activation.producer().op_type == "Mul"
        assert pair.up.matrix().shape[1] == pair.down.matrix().shape[0] == pair.width
        assert pair.up.bias_array().shape == (pair.width,)
