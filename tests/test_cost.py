"""The cost model against hand-computed MACs, and the planner's MACs against the rewritten graph's."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import init, make_model, tensor_input
from onnx import helper

import onnxlr
from onnxlr.factorize import cost
from onnxlr.model_io.shapes import infer_shapes

RNG = np.random.default_rng(5)


def costs_of(model, input_shapes=None):
    ir_model = ir.serde.deserialize_model(model)
    shapes = infer_shapes(ir_model, input_shapes)
    return {c.name: c for c in cost.model_costs(ir_model, shapes)}


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_hand_computed_macs_for_each_op():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="matmul"),  # (2,5,16)x(16,8): 2*5*8*16
        helper.make_node("Gemm", ["xt", "G"], ["b"], name="gemm", transA=1),  # A^T (6,16) x (16,4): 6*4*16
        helper.make_node("Conv", ["img", "K"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1], group=2),
        helper.make_node("ConvTranspose", ["img", "T"], ["d"], name="deconv"),
        helper.make_node("Relu", ["c"], ["e"], name="relu"),
    ]
    model = make_model(
        nodes,
        [tensor_input("x", [2, 5, 16]), tensor_input("xt", [16, 6]), tensor_input("img", [1, 4, 9, 9])],
        [tensor_input("a", None), tensor_input("b", None), tensor_input("e", None), tensor_input("d", None)],
        [init("W", w(16, 8)), init("G", w(16, 4)), init("K", w(6, 2, 3, 3)), init("T", w(4, 3, 2, 2))])
    costs = costs_of(model)
    assert costs["matmul"].macs == 2 * 5 * 8 * 16
    assert costs["gemm"].macs == 6 * 4 * 16
    # Conv out (1, 6, 5, 5); each output reads Cin/g * k*k = 2*9 inputs.
    assert costs["conv"].macs == 6 * 5 * 5 * 2 * 9
    # ConvTranspose: every input element (1*4*9*9) scatters into Cout/g * k*k = 3*4 outputs.
    assert costs["deconv"].macs == 4 * 9 * 9 * 3 * 4
    assert costs["relu"].flops == 6 * 5 * 5 and costs["relu"].macs == 0
    assert costs["matmul"].flops == 2 * costs["matmul"].macs
    assert costs["matmul"].weight_bytes == 16 * 8 * 4
    assert costs["matmul"].output_bytes == 2 * 5 * 8 * 4
    assert not costs["matmul"].unknown_dims


def test_shape_overrides_fix_dynamic_dims():
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [tensor_input("x", ["batch", "seq", 16])], [tensor_input("y", None)],
                       [init("W", w(16, 8))])
    assert costs_of(model)["mm"].unknown_dims
    assert costs_of(model)["mm"].macs == 16 * 8  # per token
    fixed = costs_of(model, {"x": (4, 128, 16)})["mm"]
    assert fixed.macs == 4 * 128 * 16 * 8 and not fixed.unknown_dims


@pytest.mark.parametrize("scheme", ["output", "input", "spatial"])
def test_planned_macs_match_the_rewritten_graph(scheme):
    # The planner's MACs for a pair must be what the cost model counts on the graph it writes.
    node = helper.make_node("Conv", ["x", "K", "B"], ["y"], name="conv", strides=[2, 1], pads=[1, 0, 1, 2],
                            dilations=[1, 2], group=2)
    model = make_model([node], [tensor_input("x", [2, 8, 11, 10])], [tensor_input("y", None)],
                       [init("K", w(12, 4, 3, 3)), init("B", w(12))])
    new_model, report = onnxlr.optimize(model, rank=2, conv_scheme=scheme, allow_no_gain=True, verify=False)
    row = report["layers"][0]
    assert row["status"] == "factorized"
    assert row["macs_before"] == costs_of(model)["conv"].macs
    assert row["macs_after"] == sum(c.macs for c in costs_of(new_model).values())
    assert report["cost"]["after"]["macs"] == row["macs_after"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_planned_macs_match_for_matmul_and_gemm(side):
    if side == "right":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                 helper.make_node("Gemm", ["h", "G"], ["y"], name="gemm", transB=1)]
        inputs, inits = [tensor_input("x", [3, 24])], [init("W", w(24, 20)), init("G", w(10, 20))]
    else:
        nodes = [helper.make_node("MatMul", ["W", "x"], ["h"], name="mm"),
                 helper.make_node("Gemm", ["G", "h"], ["y"], name="gemm", transA=1)]
        inputs, inits = [tensor_input("x", [24, 3])], [init("W", w(20, 24)), init("G", w(20, 10))]
    model = make_model(nodes, inputs, [tensor_input("y", None)], inits)
    new_model, report = onnxlr.optimize(model, rank=3, verify=False)
    planned = sum(row["macs_after"] for row in report["layers"])
    assert planned == sum(c.macs for c in costs_of(new_model).values())
    assert sum(row["macs_before"] for row in report["layers"]) == sum(c.macs for c in costs_of(model).values())
