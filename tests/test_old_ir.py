"""Old IR versions (< 4: every initializer is listed as a graph input), --inputs-as-constants, generated weights.

Before IR 4 the spec required every initializer to be a graph input too, as in the classic model
zoo and ONNX's PyTorch-converted backend test models: those inputs are the weights. From IR 4 on an
initializer listed as an input can be overridden at run time, so it stays unless
--inputs-as-constants says otherwise.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import assert_outputs_close, init, make_model, onnxlr_cli, op_types, run, tensor_input
from onnx import TensorProto, helper, numpy_helper
from onnxlr.passes import REASON_CODES

import onnxlr
from onnxlr.errors import OnnxlrError

FULL_RANK = {"rank_ratio": 1.0, "allow_no_gain": True}
RNG = np.random.default_rng(3)
REPLACED = {"W1", "W2", "W3", "K"}  # the weights the model below reads through MatMul, Gemm and Conv
KEPT_INPUTS = ["x", "img", "b2", "bk"]  # the activations and the biases the new nodes still read


def weight(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def layer(report, name):
    return next(row for row in report["layers"] if row["name"] == name)


def input_weights_model(ir_version: int) -> onnx.ModelProto:
    """MatMul, Gemm (with bias), MatMul through a Transpose, and Conv (with bias), every initializer a graph input."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm"),
        helper.make_node("Gemm", ["h1", "W2", "b2"], ["h2"], name="gemm", transB=1),
        helper.make_node("Transpose", ["W3"], ["W3t"], name="t"),
        helper.make_node("MatMul", ["h2", "W3t"], ["y"], name="mm_t"),
        helper.make_node("Conv", ["img", "K", "bk"], ["z"], name="conv", pads=[1, 1, 1, 1]),
    ]
    initializers = [init("W1", weight(16, 12)), init("W2", weight(10, 12)), init("b2", weight(10)),
                    init("W3", weight(6, 10)), init("K", weight(8, 4, 3, 3)), init("bk", weight(8))]
    inputs = [tensor_input("x", [2, 16]), tensor_input("img", [1, 4, 6, 6])]
    inputs += [tensor_input(t.name, list(t.dims)) for t in initializers]
    model = make_model(nodes, inputs, [tensor_input("y", [2, 6]), tensor_input("z", [1, 8, 6, 6])], initializers,
                       opset=8)
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


FEEDS = {"x": weight(2, 16), "img": weight(1, 4, 6, 6)}


def input_names(model):
    return [value.name for value in model.graph.input]


def check_written(model, new_model):
    """What every written model keeps: the checker's approval, the output names, the outputs (full rank)."""
    onnx.checker.check_model(new_model, full_check=True)
    assert [o.name for o in new_model.graph.output] == [o.name for o in model.graph.output]
    assert_outputs_close(run(model, FEEDS), run(new_model, FEEDS))


def test_ir3_input_weights_are_factorized_and_leave_the_inputs():
    model = input_weights_model(3)
    new_model, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    check_written(model, new_model)
    assert {row["name"]: row["status"] for row in report["layers"]} == dict.fromkeys(
        ["mm", "gemm", "mm_t", "conv"], "factorized")
    names = input_names(new_model)
    initializers = {t.name for t in new_model.graph.initializer}
    assert names[:4] == KEPT_INPUTS  # the other inputs stay, in their order
    assert not REPLACED & set(names) and not REPLACED & initializers
    assert "Transpose" not in op_types(new_model)  # the folded chain is gone with its weight
    # IR 3: every initializer, the new factors included, is a graph input.
    assert initializers <= set(names)
    assert len(initializers) == 2 + 2 * 4 + 1  # the biases, the factors, the first Gemm's zero bias (opset < 11)
    assert new_model.ir_version == 3


def test_ir8_input_weights_are_skipped_and_name_the_flag():
    model = input_weights_model(8)
    new_model, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    for name in ("mm", "gemm", "mm_t", "conv"):
        row = layer(report, name)
        assert row["status"] == "skipped" and row["reason_code"] == "graph_input"
        assert "--inputs-as-constants" in row["reason"]
    assert input_names(new_model) == input_names(model)
    assert "inputs_as_constants" not in json.loads(dict(
        (p.key, p.value) for p in new_model.metadata_props)["onnxlr.settings"])
    assert report["settings"]["inputs_as_constants"] is False  # the report lists every setting


def test_ir8_inputs_as_constants_factorizes_them():
    model = input_weights_model(8)
    new_model, report = onnxlr.optimize(model, inputs_as_constants=True, **FULL_RANK, verify=False)
    check_written(model, new_model)
    assert report["totals"]["factorized"] == 4
    # IR >= 4: the replaced weights leave the inputs; the factors are plain initializers.
    assert input_names(new_model) == KEPT_INPUTS
    assert not REPLACED & {t.name for t in new_model.graph.initializer}
    settings = json.loads(dict((p.key, p.value) for p in new_model.metadata_props)["onnxlr.settings"])
    assert settings["inputs_as_constants"] is True and report["settings"]["inputs_as_constants"] is True


def test_shared_input_weight_read_by_another_op_stays_an_input():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("ReduceSum", ["W"], ["s"], name="sum", keepdims=0)]
    model = make_model(nodes, [tensor_input("x", [2, 8]), tensor_input("W", [8, 8])],
                       [tensor_input("y", [2, 8]), tensor_input("s", [])], [init("W", weight(8, 8))], opset=8)
    model.ir_version = 3
    new_model, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    assert layer(report, "mm")["reason_code"] == "shared_with_other_op"
    assert input_names(new_model) == ["x", "W"]


def test_ir3_constant_weight_in_a_subgraph_gets_listed_main_graph_factors():
    branch_nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(weight(8, 6))),
                    helper.make_node("MatMul", ["x", "Wc"], ["t"], name="inner")]
    then_branch = helper.make_graph(branch_nodes, "then", [], [tensor_input("t", [2, 6])])
    else_branch = helper.make_graph([helper.make_node("MatMul", ["x", "V"], ["e"], name="outer_read")], "else", [],
                                    [tensor_input("e", [2, 6])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="if")]
    model = make_model(nodes, [tensor_input("c", [], TensorProto.BOOL), tensor_input("x", [2, 8]),
                               tensor_input("V", [8, 6])], [tensor_input("y", [2, 6])], [init("V", weight(8, 6))],
                       opset=8)
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    new_model, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    onnx.checker.check_model(new_model, full_check=True)
    assert report["totals"]["factorized"] == 2
    assert not new_model.graph.node[0].attribute[0].g.initializer  # no subgraph initializer at IR 3
    assert {t.name for t in new_model.graph.initializer} <= set(input_names(new_model))
    assert "V" not in input_names(new_model)
    for flag in (True, False):
        feeds = {"c": np.array(flag), "x": weight(2, 8)}
        assert_outputs_close(run(model, feeds), run(new_model, feeds))


def test_settings_refuse_a_non_bool_flag():
    with pytest.raises(OnnxlrError, match="inputs_as_constants must be True or False"):
        onnxlr.optimize(input_weights_model(8), inputs_as_constants="yes", verify=False)


def test_cli_flag_and_verification_on_ir3(tmp_path):
    for ir_version, flags in ((3, []), (8, ["--inputs-as-constants"])):
        source = tmp_path / f"ir{ir_version}.onnx"
        onnx.save(input_weights_model(ir_version), source)
        out, report = tmp_path / f"ir{ir_version}-lr.onnx", tmp_path / f"ir{ir_version}.json"
        result = onnxlr_cli("optimize", source, out, "--rank-ratio", "1", "--allow-no-gain", "--report", report,
                            "--atol", "1e-3", "--rtol", "1e-3", *flags)
        assert result.returncode == 0, result.stderr
        written = onnx.load(out)
        onnx.checker.check_model(written, full_check=True)
        assert json.loads(report.read_text())["totals"]["factorized"] == 4
        assert input_names(written)[:4] == KEPT_INPUTS


# ----------------------------------------------------------------------------- generated weights


def generated_model(generator: str) -> onnx.ModelProto:
    """A MatMul whose weight an op generates from constants (or from the activation's shape: runtime)."""
    shape = numpy_helper.from_array(np.array([8, 6], np.int64))
    fill = numpy_helper.from_array(np.array([0.5], np.float32))
    nodes = {
        "ConstantOfShape": [helper.make_node("Constant", [], ["shape"], value=shape),
                            helper.make_node("ConstantOfShape", ["shape"], ["W"], value=fill)],
        "EyeLike": [helper.make_node("Constant", [], ["base"], value=numpy_helper.from_array(weight(8, 6))),
                    helper.make_node("EyeLike", ["base"], ["W"])],
        "RandomNormal": [helper.make_node("RandomNormal", [], ["W"], shape=[8, 6], seed=1.0)],
        "Range": [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.array(v, np.float32)))
                  for n, v in (("start", 0.0), ("limit", 48.0), ("delta", 1.0))]
                 + [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
                    helper.make_node("Constant", [], ["shape"], value=shape),
                    helper.make_node("Reshape", ["r", "shape"], ["W"])],
        "runtime": [helper.make_node("Shape", ["x"], ["xs"]),
                    helper.make_node("ConstantOfShape", ["xs"], ["W0"], value=fill),
                    helper.make_node("Transpose", ["W0"], ["W"])],
    }[generator]
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"))
    x_shape = [6, 8] if generator == "runtime" else [2, 8]
    y_shape = [6, 6] if generator == "runtime" else [2, 6]
    return make_model(nodes, [tensor_input("x", x_shape)], [tensor_input("y", y_shape)], opset=17)


@pytest.mark.parametrize("generator", ["ConstantOfShape", "EyeLike", "RandomNormal", "Range"])
def test_generated_weight_is_left_alone_with_its_code(generator):
    model = generated_model(generator)
    new_model, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    row = layer(report, "mm")
    assert row["status"] == "skipped" and row["reason_code"] == "generated_weight"
    assert generator in row["reason"] and "grow the file" in row["reason"]
    assert "generated_weight" in REASON_CODES
    assert op_types(new_model) == op_types(model)


def test_generator_fed_by_an_activation_is_computed_at_run_time():
    _, report = onnxlr.optimize(generated_model("runtime"), **FULL_RANK, verify=False)
    assert layer(report, "mm")["reason_code"] == "runtime_weight"


# ----------------------------------------------------------------------------- ONNX's PyTorch-converted models


def _pytorch_converted() -> list[Path]:
    """ONNX's PyTorch-converted backend test models (IR 3, opset 6) with a Conv, Gemm or MatMul weight."""
    root = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"
    found = []
    for folder in sorted(root.glob("*")):
        path = folder / "model.onnx"
        if path.exists() and {n.op_type for n in onnx.load(path).graph.node} & {"Conv", "Gemm", "MatMul"}:
            found.append(folder)
    return found


PYTORCH_CONVERTED = _pytorch_converted()
# What cannot be factorized there, and why: depthwise convs have nothing to factorize; Linear is a
# Gemm at opset 6 (< 7, skipped as old_opset), which onnxruntime has no kernel for either.
LEFT_ALONE = {"test_Conv2d_depthwise": "depthwise", "test_Conv2d_depthwise_padded": "depthwise",
              "test_Conv2d_depthwise_strided": "depthwise", "test_Conv2d_depthwise_with_multiplier": "depthwise",
              "test_Linear": "old_opset"}


def _tensors(folder: Path, kind: str) -> list[np.ndarray]:
    files = sorted(glob.glob(os.path.join(folder, "test_data_set_0", f"{kind}_*.pb")),
                   key=lambda p: int(Path(p).stem.split("_")[1]))
    return [numpy_helper.to_array(onnx.load_tensor(p)) for p in files]


def test_the_pytorch_converted_models_are_found():
    assert len(PYTORCH_CONVERTED) >= 20, "onnx no longer ships its PyTorch-converted test models"


@pytest.mark.parametrize("folder", PYTORCH_CONVERTED, ids=lambda f: f.name)
def test_pytorch_converted_model_is_reproduced(folder):
    source = onnx.load(folder / "model.onnx")
    assert source.ir_version < 4
    new_model, report = onnxlr.optimize(str(folder / "model.onnx"), **FULL_RANK, verify=False)
    proto = ir.to_proto(new_model)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == [o.name for o in source.graph.output]
    if folder.name in LEFT_ALONE:
        assert {row["reason_code"] for row in report["layers"]} == {LEFT_ALONE[folder.name]}
        if LEFT_ALONE[folder.name] == "old_opset":
            return  # onnxruntime runs no Gemm-6: nothing to compare
    else:
        assert report["totals"]["factorized"] >= 1
        assert {t.name for t in proto.graph.initializer} <= {v.name for v in proto.graph.input}
    inputs, expected = _tensors(folder, "input"), _tensors(folder, "output")
    feeds = dict(zip([v.name for v in proto.graph.input if v.name not in {t.name for t in proto.graph.initializer}],
                     inputs))
    assert len(feeds) == len(inputs)
    assert_outputs_close(expected, run(proto, feeds), rtol=1e-4, atol=1e-5)
