"""Joint compression of every pair kind through the pipeline: gated MLPs (SwiGLU) and conv channel pairs
(Conv -> BatchNormalization -> Relu -> MaxPool -> Conv), with calibration data, as a user runs it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, run, tensor_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from test_shared_weights import check_report_adds_up, weight_bytes

import onnxlr
from onnxlr.coupled import joint, pairs
from onnxlr.coupled import plans as coupled
from onnxlr.model_io.io import load

RNG = np.random.default_rng(161)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws the same data whichever tests ran before it in this worker (xdist reorders them)."""
    global RNG
    RNG = np.random.default_rng(161)
D_IN, WIDTH, CHANNELS = 24, 96, 32


def swiglu():
    """down(SiLU(x·Wg) * (x·Wu)) with half of the neurons near-copies of the other half."""
    half = RNG.standard_normal((D_IN, WIDTH // 2)) / 5
    gate = np.concatenate([half, half * 1.01], axis=1).astype(np.float32)
    value = np.concatenate([half[:, ::-1], half[:, ::-1] * 0.99], axis=1).astype(np.float32)
    down = (RNG.standard_normal((WIDTH, D_IN)) / 8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate_proj"),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["act"]),
             helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up_proj"),
             helper.make_node("Mul", ["act", "u"], ["z"]),
             helper.make_node("MatMul", ["z", "Wd"], ["y"], name="down_proj")]
    model = make_model(nodes, [tensor_input("x", ["n", D_IN])], [tensor_input("y", None)],
                       [init("Wg", gate), init("Wu", value), init("Wd", down)], opset=20)
    return model, lambda count: {"x": RNG.standard_normal((count, D_IN)).astype(np.float32)}


def conv_bn_pool_conv():
    """Conv 3x3 -> BatchNormalization -> Relu -> MaxPool -> Conv 3x3, redundant first-conv channels."""
    half = RNG.standard_normal((CHANNELS // 2, 3, 3, 3)) / 4
    first = np.concatenate([half, half * 1.02]).astype(np.float32)
    second = (RNG.standard_normal((16, CHANNELS, 3, 3)) / 10).astype(np.float32)
    scale = (1 + 0.1 * RNG.standard_normal(CHANNELS)).astype(np.float32)
    shift, mean = (0.1 * RNG.standard_normal((2, CHANNELS))).astype(np.float32)
    var = (1 + 0.1 * RNG.random(CHANNELS)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "B", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "W2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    weights = [init("W1", first), init("b1", (0.1 * RNG.standard_normal(CHANNELS)).astype(np.float32)),
               init("s", scale), init("B", shift), init("m", mean), init("v", var),
               init("W2", second), init("b2", (0.1 * RNG.standard_normal(16)).astype(np.float32))]
    model = make_model(nodes, [tensor_input("x", ["n", 3, 12, 12])], [tensor_input("y", None)], weights, opset=17)
    return model, lambda count: {"x": RNG.standard_normal((count, 3, 12, 12)).astype(np.float32)}


KINDS = {"gated": swiglu, "conv": conv_bn_pool_conv}


def cosine(model, candidate, feeds):
    reference, out = run(model, feeds)[0].ravel(), run(candidate, feeds)[0].ravel()
    return float(reference @ out / np.linalg.norm(reference) / np.linalg.norm(out))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_layer_of_the_pair_is_sliced_and_the_model_shrinks(kind):
    model, data = KINDS[kind]()
    calibration, heldout = [data(64) for _ in range(4)], data(64)
    per_matrix, _ = onnxlr.optimize(model, calibration=calibration, param_budget=0.5, methods=("svd",), verify=False)
    result, report = onnxlr.optimize(model, calibration=calibration, param_budget=0.5, verify=False)  # joint by default
    joint_rows = [row for row in report["layers"] if row["method"] == "joint"]
    assert len(joint_rows) == (3 if kind == "gated" else 2)
    assert len({row["rank"] for row in joint_rows}) == 1 and joint_rows[0]["rank"] < joint_rows[0]["full_rank"]
    check_report_adds_up(report)
    assert weight_bytes(result) < weight_bytes(model)
    onnx.checker.check_model(result, full_check=True)
    assert len(result.graph.node) == len(model.graph.node)  # slicing adds no node
    assert cosine(model, result, heldout) > cosine(model, per_matrix, heldout)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_target_search_measures_what_is_written(kind):
    """The runner's feeds for a joint pair (zero weights at dropped neurons, refitted bias) compute what the
    sliced model computes: the search's figure at its chosen budget is the written model's."""
    model, data = KINDS[kind]()
    calibration, heldout = [data(64) for _ in range(4)], [data(32) for _ in range(2)]
    result, report = onnxlr.optimize(model, calibration=calibration, heldout=heldout, target_cosine=0.97, verify=False)
    assert any(row["method"] == "joint" for row in report["layers"])
    chosen = min((t for t in report["calibration"]["search"] if t["cosine"] >= 0.97), key=lambda t: t["budget"])
    reference = np.concatenate([run(model, f)[0] for f in heldout]).ravel()
    written = np.concatenate([run(result, f)[0] for f in heldout]).ravel()
    measured = float(reference @ written / np.linalg.norm(reference) / np.linalg.norm(written))
    assert measured == pytest.approx(chosen["cosine"], abs=2e-5)


ACTIVATIONS = {  # name -> (nodes from h to z, the opset it needs)
    "Relu": (lambda: [helper.make_node("Relu", ["h"], ["z"])], 13),
    "Gelu": (lambda: [helper.make_node("Gelu", ["h"], ["z"])], 20),
    "Tanh": (lambda: [helper.make_node("Tanh", ["h"], ["z"])], 13),
    "SiLU": (lambda: [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["z"])], 13),
    "HardSwish": (lambda: [helper.make_node("HardSwish", ["h"], ["z"])], 14),
    "LeakyRelu": (lambda: [helper.make_node("LeakyRelu", ["h"], ["z"], alpha=0.1)], 13),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(activation=st.sampled_from(sorted(ACTIVATIONS)), gemm=st.booleans(), up_bias=st.booleans(),
       down_bias=st.booleans(), half=st.booleans(), opset=st.sampled_from([13, 17, 20, 21]),
       width=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_keeping_every_neuron_is_exact_across_activations_dtypes_and_opsets(activation, gemm, up_bias, down_bias,
                                                                           half, opset, width, seed):
    """The rewrite with all D neurons kept (the fit joint.select_and_refit returns then) gives the original
    outputs, for MatMul(+Add) and Gemm pairs, float32 and float16, opsets 13-21."""
    make_activation, needs = ACTIVATIONS[activation]
    opset = max(opset, needs)
    rng = np.random.default_rng(seed)
    dtype, elem = (np.float16, onnx.TensorProto.FLOAT16) if half else (np.float32, onnx.TensorProto.FLOAT)
    w1, w2 = rng.standard_normal((6, width)).astype(dtype), rng.standard_normal((width, 5)).astype(dtype)
    b1, b2 = rng.standard_normal(width).astype(dtype), rng.standard_normal(5).astype(dtype)
    inits = [init("W1", w1.T.copy() if gemm else w1), init("W2", w2.T.copy() if gemm else w2)]
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "W1"] + (["b1"] if up_bias else []), ["h"], name="up", transB=1),
                 *make_activation(),
                 helper.make_node("Gemm", ["z", "W2"] + (["b2"] if down_bias else []), ["y"], name="down", transB=1)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0" if up_bias else "h"], name="up"),
                 *([helper.make_node("Add", ["h0", "b1"], ["h"])] if up_bias else []), *make_activation(),
                 helper.make_node("MatMul", ["z", "W2"], ["y0" if down_bias else "y"], name="down"),
                 *([helper.make_node("Add", ["y0", "b2"], ["y"])] if down_bias else [])]
    inits += ([init("b1", b1)] if up_bias else []) + ([init("b2", b2)] if down_bias else [])
    model = make_model(nodes, [tensor_input("x", [4, 6], elem)], [tensor_input("y", None, elem)], inits, opset=opset)
    ir_model = load(model).model
    (pair,), _ = pairs.find_mlp_pairs(ir_model)
    fit = joint.select_and_refit(pair.down_matrix(), pair.down_bias(), np.eye(width + 1), width)
    coupled.rewrite(ir_model, [coupled.PairPlan(pair, ups=[], down=None, fit=fit)])
    feeds = {"x": rng.standard_normal((4, 6)).astype(dtype)}
    np.testing.assert_array_equal(run(model, feeds)[0], run(ir.to_proto(ir_model), feeds)[0])
