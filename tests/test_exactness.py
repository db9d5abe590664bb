"""Every rewrite is exact at full rank: onnxruntime gives the original outputs, for random shapes and
every attribute combination the ONNX spec allows (hypothesis draws them)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import assert_outputs_close, init, make_model, op_types, run, tensor_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxlr

FULL_RANK = {"rank_ratio": 1.0, "allow_no_gain": True}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def optimize_and_compare(model, feeds, expect_factorized=1, **kwargs):
    new_model, report = onnxlr.optimize(model, **{**FULL_RANK, **kwargs}, verify=False)
    onnx.checker.check_model(new_model, full_check=True)
    factorized = [layer for layer in report["layers"] if layer["status"] == "factorized"]
    assert len(factorized) == expect_factorized, report["layers"]
    assert_outputs_close(run(model, feeds), run(new_model, feeds))
    return new_model, report


# ----------------------------------------------------------------------------- MatMul


@SETTINGS
@given(side=st.sampled_from(["right", "left"]), batch=st.lists(st.integers(1, 3), max_size=2),
       k=st.integers(1, 9), n=st.integers(1, 9), m=st.integers(1, 5), vector=st.booleans(), seed=st.integers(0, 99))
def test_matmul_exact(side, batch, k, n, m, vector, seed):
    rng = np.random.default_rng(seed)
    if side == "right":  # X (..., m, k) or (k,) times W (k, n)
        x_shape = [k] if vector else [*batch, m, k]
        weight = rng.standard_normal((k, n)).astype(np.float32)
        inputs = ["x", "W"]
    else:  # W (n, k) times X (..., k, m) or (k,)
        x_shape = [k] if vector else [*batch, k, m]
        weight = rng.standard_normal((n, k)).astype(np.float32)
        inputs = ["W", "x"]
    node = helper.make_node("MatMul", inputs, ["y"], name="mm")
    model = make_model([node], [tensor_input("x", x_shape)], [tensor_input("y", None)], [init("W", weight)])
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    new_model, _ = optimize_and_compare(model, feeds)
    assert op_types(new_model) == ["MatMul", "MatMul"]


# ----------------------------------------------------------------------------- Gemm


C_SHAPES = {"none": None, "scalar": (), "one": (1,), "row": ("n",), "row2d": (1, "n"), "column": ("m", 1),
            "full": ("m", "n")}


@SETTINGS
@given(weight_in=st.sampled_from(["B", "A"]), trans_a=st.integers(0, 1), trans_b=st.integers(0, 1),
       alpha=st.sampled_from([None, 1.0, 0.5, -2.0]), beta=st.sampled_from([None, 1.0, 0.0, 3.0]),
       c_kind=st.sampled_from(sorted(C_SHAPES)), m=st.integers(1, 6), k=st.integers(1, 7), n=st.integers(1, 7),
       opset=st.sampled_from([7, 9, 11, 13, 17, 21]), seed=st.integers(0, 99))
def test_gemm_exact(weight_in, trans_a, trans_b, alpha, beta, c_kind, m, k, n, opset, seed):
    rng = np.random.default_rng(seed)
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    attrs = {"transA": trans_a, "transB": trans_b}
    if alpha is not None:
        attrs["alpha"] = alpha
    if beta is not None:
        attrs["beta"] = beta
    c_shape = C_SHAPES[c_kind]
    if c_shape is None and opset < 11:
        c_shape = ("n",)  # C is required before opset 11
    inits, inputs = [], []
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    if weight_in == "B":
        inits.append(init("W", b))
        node_inputs = ["x", "W"]
        inputs.append(tensor_input("x", list(a_shape)))
        feeds = {"x": a}
    else:
        inits.append(init("W", a))
        node_inputs = ["W", "x"]
        inputs.append(tensor_input("x", list(b_shape)))
        feeds = {"x": b}
    if c_shape is not None:
        concrete = tuple({"m": m, "n": n}.get(d, d) for d in c_shape)
        inits.append(init("C", rng.standard_normal(concrete).astype(np.float32)))
        node_inputs.append("C")
    node = helper.make_node("Gemm", node_inputs, ["y"], name="gemm", **attrs)
    model = make_model([node], inputs, [tensor_input("y", [m, n])], inits, opset=opset)
    new_model, _ = optimize_and_compare(model, feeds)
    assert op_types(new_model) == ["Gemm", "Gemm"]


# ----------------------------------------------------------------------------- Conv


@st.composite
def conv_cases(draw):
    dims = draw(st.integers(1, 3))
    scheme = draw(st.sampled_from(["output", "input", "spatial"] if dims == 2 else ["output", "input"]))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    cin = group * draw(st.integers(1, 3))
    cout = group * draw(st.integers(1, 3))
    if group > 1 and cin == group:
        cin = 2 * group  # not depthwise: that one is skipped on purpose
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    strides = [draw(st.integers(1, 2)) for _ in range(dims)]
    dilations = [draw(st.integers(1, 2)) for _ in range(dims)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = [draw(st.integers(0, 2)) for _ in range(2 * dims)]
    if auto_pad.startswith("SAME"):
        dilations = [1] * dims  # onnxruntime cannot run dilated SAME convs (the original would fail)
    # Input large enough for the dilated kernel.
    size = [(k - 1) * d + 1 + draw(st.integers(0, 4)) for k, d in zip(kernel, dilations)]
    return {
        "dims": dims, "scheme": scheme, "group": group, "cin": cin, "cout": cout, "kernel": kernel,
        "strides": strides, "dilations": dilations, "auto_pad": auto_pad, "pads": pads, "size": size,
        "bias": draw(st.booleans()), "explicit_kernel_shape": draw(st.booleans()),
        "explicit_defaults": draw(st.booleans()), "seed": draw(st.integers(0, 99)),
    }


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases())
def test_conv_exact(case):
    rng = np.random.default_rng(case["seed"])
    weight = rng.standard_normal((case["cout"], case["cin"] // case["group"], *case["kernel"])).astype(np.float32)
    attrs = {}
    if case["group"] > 1 or case["explicit_defaults"]:
        attrs["group"] = case["group"]
    if case["explicit_kernel_shape"]:
        attrs["kernel_shape"] = case["kernel"]
    if case["strides"] != [1] * case["dims"] or case["explicit_defaults"]:
        attrs["strides"] = case["strides"]
    if case["dilations"] != [1] * case["dims"] or case["explicit_defaults"]:
        attrs["dilations"] = case["dilations"]
    if case["auto_pad"] == "NOTSET":
        if any(case["pads"]) or case["explicit_defaults"]:
            attrs["pads"] = case["pads"]
    else:
        attrs["auto_pad"] = case["auto_pad"]
    inits = [init("W", weight)]
    node_inputs = ["x", "W"]
    if case["bias"]:
        inits.append(init("B", rng.standard_normal(case["cout"]).astype(np.float32)))
        node_inputs.append("B")
    node = helper.make_node("Conv", node_inputs, ["y"], name="conv", **attrs)
    x_shape = [2, case["cin"], *case["size"]]
    model = make_model([node], [tensor_input("x", x_shape)], [tensor_input("y", None)], inits)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    new_model, report = optimize_and_compare(model, feeds, conv_scheme=case["scheme"])
    assert report["layers"][0]["scheme"] == case["scheme"]
    assert op_types(new_model) == ["Conv", "Conv"]
    groups = [a.i for n in new_model.graph.node for a in n.attribute if a.name == "group"]
    assert groups == [case["group"], case["group"]]  # grouped convs stay grouped


def test_conv_auto_scheme_is_exact_and_prefers_fewer_macs():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model([node], [tensor_input("x", [1, 16, 12, 12])], [tensor_input("y", None)], [init("W", weight)])
    feeds = {"x": rng.standard_normal((1, 16, 12, 12)).astype(np.float32)}
    _, report = optimize_and_compare(model, feeds)
    layer = report["layers"][0]
    assert layer["scheme"] in ("output", "input", "spatial")
    # At full rank all schemes keep all the energy; auto must have chosen the cheapest of them.
    macs = {}
    for scheme in ("output", "input", "spatial"):
        _, forced = onnxlr.optimize(model, conv_scheme=scheme, **FULL_RANK, verify=False)
        macs[scheme] = forced["layers"][0]["macs_after"]
    assert layer["macs_after"] == min(macs.values())


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_matmul_and_conv_keep_weight_dtype(dtype):
    rng = np.random.default_rng(1)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    # onnxruntime's CPU provider has no float64 Conv: there the first layer is a Gemm on the flat image.
    first = (helper.make_node("Conv", ["x", "K"], ["h"], name="conv", pads=[1, 1, 1, 1]) if dtype == np.float16
             else helper.make_node("Gemm", ["xf", "K"], ["h"], name="gemm", transB=1))
    nodes = [helper.make_node("Flatten", ["x"], ["xf"]), first,
             helper.make_node("Flatten", ["h"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    kernel_shape = (4, 3, 3, 3) if dtype == np.float16 else (4 * 5 * 5, 3 * 5 * 5)
    inits = [init("K", rng.standard_normal(kernel_shape).astype(dtype)),
             init("W", (rng.standard_normal((4 * 5 * 5, 6)) / 10).astype(dtype))]
    model = make_model(nodes, [tensor_input("x", [2, 3, 5, 5], elem)], [tensor_input("y", [2, 6], elem)], inits)
    feeds = {"x": rng.standard_normal((2, 3, 5, 5)).astype(dtype)}
    new_model, _ = onnxlr.optimize(model, **FULL_RANK, verify=False)
    for tensor in new_model.graph.initializer:
        assert tensor.data_type == elem
    tolerance = 2e-2 if dtype == np.float16 else 1e-9
    assert_outputs_close(run(model, feeds), run(new_model, feeds), rtol=tolerance, atol=tolerance)


def test_bfloat16_factors_stay_bfloat16_and_multiply_back():
    import ml_dtypes

    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [tensor_input("x", [4, 16], TensorProto.BFLOAT16)],
                       [tensor_input("y", [4, 8], TensorProto.BFLOAT16)], [init("W", weight)])
    new_model, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    assert report["layers"][0]["status"] == "factorized"
    factors = {t.name: onnx.numpy_helper.to_array(t) for t in new_model.graph.initializer}
    assert all(t.data_type == TensorProto.BFLOAT16 for t in new_model.graph.initializer)
    first = new_model.graph.node[0].input[1]
    second = new_model.graph.node[1].input[1]
    product = factors[first].astype(np.float32) @ factors[second].astype(np.float32)
    np.testing.assert_allclose(product, weight.astype(np.float32), rtol=0.05, atol=0.05)
