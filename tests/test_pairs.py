"""onnxlr.coupled.pairs and onnxlr.coupled.conv_pairs: coupled pairs (MLP, gated MLP, conv channels) and their slicing API."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, run, tensor_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxlr.coupled import joint
from onnxlr.coupled.conv_pairs import find_conv_pairs
from onnxlr.coupled.pairs import find_mlp_pairs

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


def test_gate_with_an_activation_on_both_sides_is_one_gated_pair():
    """silu(x·W1) * relu(x·W3), then ·W2: the projection first in graph order is the gate, found once."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"), *activation("silu", target="g1"),
             helper.make_node("MatMul", ["x", "W3"], ["h2"], name="up2"),
             *activation("relu", source="h2", target="g2", prefix="b_"),
             helper.make_node("Mul", ["g1", "g2"], ["a"], name="gate"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    inits = [init("W1", W1), init("W2", W2), init("W3", W3)]
    proto = make_model(nodes, [tensor_input("x", [2, IN])], [tensor_input("y", None)], inits)
    pair = only_pair(ir.serde.deserialize_model(proto))
    assert (pair.gate.node.name, pair.up.node.name, pair.down.node.name, pair.kind) == ("up", "up2", "down", "gated")
    assert_keep_all_is_identity(proto, find_mlp_pairs)


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


# ----------------------------------------------------------------------------- builders for every pair kind


def linear(nodes, inits, rng, name, source, target, shape, op="MatMul", bias=False, trans=False):
    """target = source·W [+ b]: MatMul [+ Add], or Gemm (W stored (out, in) with transB=1 when trans)."""
    weight = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    inits.append(init(f"{name}_W", weight.T.copy() if trans else weight))
    if bias:
        inits.append(init(f"{name}_b", rng.standard_normal(shape[1]).astype(np.float32)))
    if op == "Gemm":
        inputs = [source, f"{name}_W"] + ([f"{name}_b"] if bias else [])
        nodes.append(helper.make_node("Gemm", inputs, [target], name=name, transB=int(trans)))
        return
    nodes.append(helper.make_node("MatMul", [source, f"{name}_W"], [f"{name}_mm" if bias else target], name=name))
    if bias:
        nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [target], name=f"{name}_bias"))


def mlp_model(gated=True, kind="silu", value_first=False, bias=True, op="MatMul", trans=False, d_in=IN, width=D,
              d_out=OUT, rows=(5,), seed=0, extra_nodes=(), extra_outputs=(), extra_inits=()):
    """x -> [act(x·Wg + bg) * (x·Wu + bu)] (or act(x·Wu + bu) when not gated) -> ·Wd + bd -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], list(extra_inits)
    if gated:
        linear(nodes, inits, rng, "gate", "x", "hg", (d_in, width), op, bias, trans)
        nodes += activation(kind, source="hg", target="ag", prefix="g_")
        linear(nodes, inits, rng, "value", "x", "hv", (d_in, width), op, bias, trans)
        nodes.append(helper.make_node("Mul", ["hv", "ag"] if value_first else ["ag", "hv"], ["a"], name="mul"))
    else:
        linear(nodes, inits, rng, "value", "x", "hv", (d_in, width), op, bias, trans)
        nodes += activation(kind, source="hv", target="a", prefix="g_")
    linear(nodes, inits, rng, "down", "a", "y", (width, d_out), op, bias, trans)
    outputs = [tensor_input("y", None)] + [tensor_input(name, None) for name in extra_outputs]
    return make_model(nodes + list(extra_nodes), [tensor_input("x", [*rows, d_in])], outputs, inits, opset=20)


def conv_model(norm=True, pool="MaxPool", kind="relu", up_kernel=3, down_kernel=3, down_attrs=None, up_bias=True,
               down_bias=True, c_in=3, width=D, c_out=4, size=8, batch=2, seed=0, up_group=1, down_group=1,
               extra_nodes=(), extra_outputs=(), extra_inits=()):
    """x -> Conv(W1, b1) -> [BatchNormalization] -> f -> [pool] -> Conv(W2, b2, down_attrs) -> y."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((width, c_in // up_group, up_kernel, up_kernel)) / np.sqrt(c_in * up_kernel**2)
    w2 = rng.standard_normal((c_out, width // down_group, down_kernel, down_kernel)) / np.sqrt(width * down_kernel**2)
    inits = [init("W1", w1.astype(np.float32)), init("W2", w2.astype(np.float32)), *extra_inits]
    if up_bias:
        inits.append(init("b1", rng.standard_normal(width).astype(np.float32)))
    if down_bias:
        inits.append(init("b2", rng.standard_normal(c_out).astype(np.float32)))
    nodes = [helper.make_node("Conv", ["x", "W1"] + (["b1"] if up_bias else []), ["c"], name="up", group=up_group,
                              pads=[up_kernel // 2] * 4)]
    source = "c"
    if norm:
        for name, low, high in (("scale", 0.5, 2.0), ("shift", -1.0, 1.0), ("mean", -1.0, 1.0), ("var", 0.5, 2.0)):
            inits.append(init(name, rng.uniform(low, high, width).astype(np.float32)))
        nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], name="norm"))
        source = "n"
    nodes += activation(kind, source=source, target="r", prefix="act_")
    source = "r"
    if pool:
        attrs = {} if pool.startswith("Global") else {"kernel_shape": [2, 2], "strides": [2, 2]}
        nodes.append(helper.make_node(pool, ["r"], ["p"], name="pool", **attrs))
        source = "p"
    nodes.append(helper.make_node("Conv", [source, "W2"] + (["b2"] if down_bias else []), ["y"], name="down",
                                  group=down_group, **(down_attrs or {})))
    outputs = [tensor_input("y", None)] + [tensor_input(name, None) for name in extra_outputs]
    return make_model(nodes + list(extra_nodes), [tensor_input("x", [batch, c_in, size, size])], outputs, inits)


def feeds_for(proto, seed=1):
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def found(proto, find):
    model = ir.serde.deserialize_model(proto)
    pairs, rejected = find(model)
    assert rejected == [] and len(pairs) == 1, rejected
    return model, pairs[0]


def rejection(proto, find):
    pairs, rejected = find(ir.serde.deserialize_model(proto))
    assert pairs == [] and len(rejected) == 1, (pairs, rejected)
    return rejected[0][0].name, rejected[0][1]


def replaced(model, slices, forget=()):
    """The serialized model with each slice's constant input replaced by a new initializer (as coupled will)."""
    for node, old, array in slices:
        value = ir.Value(name=f"{old.name}_new", const_value=ir.tensor(array))
        model.graph.register_initializer(value)
        node.replace_input_with(next(i for i, v in enumerate(node.inputs) if v is old), value)
        if old.is_initializer() and not list(old.uses()):
            model.graph.initializers.pop(old.name)
    for value in forget:
        value.shape = None
    return ir.serde.serialize_model(model)


def assert_keep_all_is_identity(proto, find):
    """All neurons kept, the original down matrix: onnxruntime computes the original outputs."""
    model, pair = found(proto, find)
    slices = pair.slices(np.arange(pair.width), pair.down_matrix(), pair.down_bias())
    assert sum(array.size for _, _, array in slices) == pair.original_params
    for _, old, array in slices:
        np.testing.assert_array_equal(array, ir.convenience.get_const_tensor(old).numpy())
    feeds = feeds_for(proto)
    np.testing.assert_allclose(run(replaced(model, slices, pair.inner_values()), feeds)[0], run(proto, feeds)[0],
                               rtol=1e-6, atol=1e-6)


def sliced_and_padded(proto, find, kept, matrix, bias, feeds):
    """Outputs of the sliced model and of the original with padded_down (and the bias) fed in place."""
    model, pair = found(proto, find)
    slices = pair.slices(kept, matrix, bias)
    assert sum(array.size for _, _, array in slices) == pair.weight_params(len(kept)) - \
        (pair.fixed_params if bias is None else 0)
    sliced = run(replaced(model, slices, pair.inner_values()), feeds)[0]
    model, pair = found(proto, find)
    padded = pair.padded_down(kept, matrix)
    assert padded.shape == ir.convenience.get_const_tensor(pair.down.weight).shape and padded.dtype == np.float32
    swaps = [(pair.down.node, pair.down.weight, padded)] + ([pair.slices(kept, matrix, bias)[-1]] if bias is not None
                                                           else [])
    return sliced, run(replaced(model, swaps), feeds)[0]


def assert_close(actual, expected, tol=1e-5):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------- gated MLPs


@pytest.mark.parametrize("kind", ["silu", "gelu", "erf"])
@pytest.mark.parametrize("value_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_gated_mlp_pairs(kind, value_first, bias, op):
    proto = mlp_model(kind=kind, value_first=value_first, bias=bias, op=op, trans=op == "Gemm")
    _, pair = found(proto, find_mlp_pairs)
    assert (pair.gate.node.name, pair.up.node.name, pair.down.node.name) == ("gate", "value", "down")
    assert (pair.kind, pair.width, pair.block, pair.activation.name) == ("gated", D, 1, "a")
    assert pair.up_layers() == [pair.gate, pair.up]
    assert (pair.gate.bias is None) == (pair.up.bias is None) == (pair.down_bias() is None) == (not bias)
    assert pair.down_matrix().shape == (D, OUT)
    assert pair.params_per_neuron == 2 * (IN + bias) + OUT and pair.fixed_params == OUT * bias
    assert_keep_all_is_identity(proto, find_mlp_pairs)


def test_plain_pairs_have_no_gate():
    _, pair = found(mlp_model(gated=False), find_mlp_pairs)
    assert pair.gate is None and pair.kind == "mlp" and pair.up_layers() == [pair.up]


def test_gated_value_read_elsewhere_is_not_a_pair():
    side = helper.make_node("Softmax", ["hv"], ["side"], name="side")
    proto = mlp_model(bias=False, extra_nodes=[side], extra_outputs=["side"])
    assert rejection(proto, find_mlp_pairs) == ("gate", "intermediate is also read by Softmax node 'side'")


def test_gated_projections_of_different_inputs_are_not_a_pair():
    proto = mlp_model(bias=False)
    for node in proto.graph.node:
        if node.name == "value":
            node.input[0] = "x2"
    proto.graph.input.append(tensor_input("x2", [5, IN]))
    assert rejection(proto, find_mlp_pairs) == ("gate", "gated projections 'gate' and 'value' read different inputs")


def test_gated_value_weight_shared_is_not_a_pair():
    other = helper.make_node("MatMul", ["x", "value_W"], ["z"], name="other")
    proto = mlp_model(bias=False, extra_nodes=[other], extra_outputs=["z"])
    assert rejection(proto, find_mlp_pairs) == (
        "gate", "up MatMul node 'value': weight 'value_W' is also read by another node")


def test_gate_times_a_graph_input_is_not_a_pair():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"), *activation("silu", target="g"),
             helper.make_node("Mul", ["g", "x2"], ["a"], name="mul"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    proto = make_model(nodes, [tensor_input("x", [2, IN]), tensor_input("x2", [2, D])], [tensor_input("y", None)],
                       [init("W1", W1), init("W2", W2)])
    assert rejection(proto, find_mlp_pairs) == ("up", "the activation is read by Mul node 'mul', not a linear "
                                                       "layer's input 0")


def test_torch_llama_mlp_export_is_a_gated_pair():
    torch = pytest.importorskip("torch")

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(6, 12, bias=False), torch.nn.Linear(6, 12, bias=False)
            self.down_proj = torch.nn.Linear(12, 6, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    proto = torch_export(Mlp(), torch.randn(2, 5, 6))
    _, pair = found(proto, find_mlp_pairs)
    assert (pair.kind, pair.width) == ("gated", 12)
    assert pair.gate.node.inputs[1].const_value.numpy().shape == (6, 12)
    assert_keep_all_is_identity(proto, find_mlp_pairs)


def torch_export(module, example):
    """The module in eval mode through the TorchScript exporter (the dynamo one needs onnxscript)."""
    import torch

    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17, input_names=["x"])
    return onnx.load_from_string(buffer.getvalue())


# ----------------------------------------------------------------------------- conv channel pairs


DOWN_CONVS = [(3, None), (1, None), (3, {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
              (3, {"dilations": [2, 2], "pads": [2] * 4})]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("pool,down_kernel,down_attrs", [
    (pool, *down) for pool in (None, "MaxPool", "AveragePool", "GlobalAveragePool") for down in DOWN_CONVS
    if pool != "GlobalAveragePool" or down[0] == 1])  # a 3x3 kernel does not fit the 1x1 map of a global pool
def test_conv_pairs(norm, pool, down_kernel, down_attrs):
    proto = conv_model(norm=norm, pool=pool, down_kernel=down_kernel, down_attrs=down_attrs)
    _, pair = found(proto, find_conv_pairs)
    assert (pair.up.node.name, pair.down.node.name, pair.kind) == ("up", "down", "conv")
    assert (pair.norm is not None) == norm and (pair.norm is None or pair.norm.node.name == "norm")
    assert (pair.width, pair.block, pair.activation.name) == (D, down_kernel**2, "p" if pool else "r")
    weight = ir.convenience.get_const_tensor(pair.down.weight).numpy()
    np.testing.assert_array_equal(pair.down_matrix(), weight.reshape(4, -1).T)
    assert pair.down_matrix().shape == (D * down_kernel**2, 4) and pair.down_bias().shape == (4,)
    assert pair.params_per_neuron == 3 * 9 + 1 + 4 * norm + 4 * down_kernel**2
    assert_keep_all_is_identity(proto, find_conv_pairs)


@pytest.mark.parametrize("kind", ["relu6", "silu", "hardswish"])
def test_conv_pairs_without_biases(kind):
    proto = conv_model(norm=False, pool=None, kind=kind, up_bias=False, down_bias=False, up_kernel=1)
    _, pair = found(proto, find_conv_pairs)
    assert pair.up.bias is None and pair.down_bias() is None and pair.fixed_params == 0
    assert_keep_all_is_identity(proto, find_conv_pairs)


def test_conv_pair_inner_values():
    _, pair = found(conv_model(), find_conv_pairs)
    assert sorted(value.name for value in pair.inner_values()) == ["c", "n", "p", "r"]
    _, pair = found(mlp_model(kind="silu"), find_mlp_pairs)
    assert {value.name for value in pair.inner_values()} == {"gate_mm", "hg", "g_sig", "ag", "value_mm", "hv", "a"}


@pytest.mark.parametrize("up_group,down_group,reason", [
    (2, 1, ("up", "Conv has group=2")),
    (1, 2, ("up", "down Conv node 'down': Conv has group=2")),
])
def test_grouped_convs_are_not_pairs(up_group, down_group, reason):
    proto = conv_model(c_in=4, up_group=up_group, down_group=down_group)
    assert rejection(proto, find_conv_pairs) == reason


def test_conv_intermediate_read_elsewhere_is_not_a_pair():
    side = helper.make_node("Relu", ["c"], ["side"], name="side")  # reads the conv output beside the norm
    assert rejection(conv_model(extra_nodes=[side], extra_outputs=["side"]), find_conv_pairs) == (
        "up", "intermediate is also read by Relu node 'side'")
    assert rejection(conv_model(extra_outputs=["r"]), find_conv_pairs) == ("up", "intermediate 'r' is a graph output")


def test_conv_weights_read_elsewhere_are_not_pairs():
    other = helper.make_node("Conv", ["x", "W1"], ["z"], name="other", pads=[1] * 4)
    assert rejection(conv_model(extra_nodes=[other], extra_outputs=["z"]), find_conv_pairs) == (
        "up", "weight 'W1' is also read by another node")
    other = helper.make_node("Conv", ["p", "W2"], ["z"], name="other")
    assert rejection(conv_model(extra_nodes=[other], extra_outputs=["z"]), find_conv_pairs) == (
        "up", "intermediate is also read by Conv node 'other'")


def test_per_channel_scale_ends_the_conv_region():
    scale = helper.make_node("Mul", ["r", "gain"], ["g"], name="gain")
    proto = conv_model(pool=None, extra_nodes=[scale], extra_outputs=["g"],
                       extra_inits=[init("gain", np.ones((D, 1, 1), np.float32))])
    name, why = rejection(proto, find_conv_pairs)
    assert name == "up" and why == "intermediate is also read by Mul node 'gain'"


def test_conv_into_a_flatten_is_not_a_pair():
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="up"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten")]
    proto = make_model(nodes, [tensor_input("x", [1, 3, 4, 4])], [tensor_input("f", None)],
                       [init("W1", np.ones((D, 3, 1, 1), np.float32))])
    assert rejection(proto, find_conv_pairs) == ("up", "the activation is read by Flatten node 'flatten', not a "
                                                       "Conv's input 0")


def test_convs_without_activation_are_skipped_silently():
    proto = conv_model(pool=None, kind="relu")
    proto.graph.node.remove(next(n for n in proto.graph.node if n.op_type == "Relu"))
    next(n for n in proto.graph.node if n.name == "down").input[0] = "n"
    assert find_conv_pairs(ir.serde.deserialize_model(proto)) == ([], [])


def test_torch_conv_export_is_a_conv_pair():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 5, 3, stride=2, padding=1))
    proto = torch_export(net, torch.randn(2, 3, 8, 8))  # eval mode: the norm is folded into the first conv
    _, pair = found(proto, find_conv_pairs)
    assert (pair.width, pair.block, pair.norm) == (8, 9, None)
    assert_keep_all_is_identity(proto, find_conv_pairs)


# ----------------------------------------------------------------------------- padded_down and the refit


def calibration_vectors(proto, pair, feeds):
    """The down layer's input vectors (rows; conv: kernel patches, row order channel·taps + tap)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.ValueInfoProto(name=pair.activation.name))
    activation_ = run(probe, feeds)[-1].astype(np.float64)
    if pair.kind != "conv":
        return activation_.reshape(-1, pair.width)
    torch = pytest.importorskip("torch")
    attrs = pair.down.node.attributes
    pads = attrs["pads"].value if "pads" in attrs else [0] * 4
    assert pads[:2] == pads[2:], "unfold pads both ends alike"
    patches = torch.nn.functional.unfold(
        torch.from_numpy(activation_), pair.down.kernel, padding=tuple(pads[:2]),
        stride=tuple(attrs["strides"].value) if "strides" in attrs else 1,
        dilation=tuple(attrs["dilations"].value) if "dilations" in attrs else 1)
    return patches.numpy().transpose(0, 2, 1).reshape(-1, pair.width * pair.block)


@pytest.mark.parametrize("case", ["mlp", "gated", "gated-gemm", "conv", "conv-1x1", "conv-strided"])
def test_padded_down_of_a_refit_is_the_sliced_model(case):
    """select_and_refit on calibration vectors, then: the sliced model == the original with padded_down fed,
    and the fit's relative_error is the sliced model's measured output error on those inputs."""
    proto, find = {
        "mlp": (mlp_model(gated=False, kind="erf", rows=(64,)), find_mlp_pairs),
        "gated": (mlp_model(kind="silu", rows=(4, 16)), find_mlp_pairs),
        "gated-gemm": (mlp_model(kind="gelu", op="Gemm", trans=True, rows=(64,)), find_mlp_pairs),
        "conv": (conv_model(batch=32, down_attrs={"pads": [1] * 4}), find_conv_pairs),
        "conv-1x1": (conv_model(batch=32, pool=None, down_kernel=1), find_conv_pairs),
        "conv-strided": (conv_model(batch=32, pool=None, down_attrs={"strides": [2, 2], "dilations": [1, 2]}),
                         find_conv_pairs),
    }[case]
    feeds = feeds_for(proto)
    _, pair = found(proto, find)
    vectors = calibration_vectors(proto, pair, feeds)
    gram = joint.AugmentedGram()
    gram.add(vectors)
    fit = joint.select_and_refit(pair.down_matrix(), pair.down_bias(), gram.result(), 3, block=pair.block)
    assert len(fit.kept) == 3 and fit.down_matrix.shape == (3 * pair.block, pair.down_matrix().shape[1])
    sliced, padded = sliced_and_padded(proto, find, fit.kept, fit.down_matrix, fit.down_bias, feeds)
    assert_close(sliced, padded)
    reference = run(proto, feeds)[0].astype(np.float64)
    measured = np.sum((sliced - reference) ** 2) / np.sum(reference**2)
    assert fit.relative_error == pytest.approx(measured, rel=1e-3, abs=1e-7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["mlp", "gated", "conv"]), width=st.integers(1, 12), d_in=st.integers(1, 6),
       d_out=st.integers(2, 5), bias=st.booleans(), flag=st.booleans(), kernel=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16), data=st.data())
def test_slicing_any_pair(kind, width, d_in, d_out, bias, flag, kernel, seed, data):
    """Keep-all is the original; a random kept subset with any down matrix equals padded_down fed in place;
    the slices' sizes are weight_params(k). (flag: Gemm for MLPs, a norm and a pool for convs; d_out >= 2:
    a one-entry bias Add reads as a scalar step of an activation region.)"""
    if kind == "conv":
        proto = conv_model(norm=flag, pool="MaxPool" if flag else None, c_in=d_in, width=width, c_out=d_out,
                           down_kernel=kernel, up_bias=bias, down_bias=not bias, seed=seed,
                           down_attrs={"pads": [kernel // 2] * 4})
        find = find_conv_pairs
    else:
        proto = mlp_model(gated=kind == "gated", kind="silu", bias=bias, op="Gemm" if flag else "MatMul",
                          trans=flag and seed % 2 == 1, d_in=d_in, width=width, d_out=d_out, seed=seed,
                          rows=(3,) if flag else (2, 3))
        find = find_mlp_pairs
    proto = onnx.shape_inference.infer_shapes(proto)  # recorded inner shapes: slicing must forget them
    assert_keep_all_is_identity(proto, find)
    _, pair = found(proto, find)
    rng = np.random.default_rng(seed)
    keep = data.draw(st.integers(1, width))
    kept = np.sort(rng.choice(width, keep, replace=False))
    matrix = rng.standard_normal((keep * pair.block, d_out))
    down_bias = rng.standard_normal(d_out) if pair.down_bias() is not None and data.draw(st.booleans()) else None
    sliced, padded = sliced_and_padded(proto, find, kept, matrix, down_bias, feeds_for(proto, seed))
    assert_close(sliced, padded)


def test_slices_check_their_arguments():
    _, pair = found(mlp_model(bias=False), find_mlp_pairs)
    with pytest.raises(ValueError, match="rows"):
        pair.slices([0, 1], np.zeros((3, OUT)))
    with pytest.raises(ValueError, match="no bias"):
        pair.slices([0, 1], np.zeros((2, OUT)), np.zeros(OUT))
