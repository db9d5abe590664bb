"""Where weights are found, what is left alone (and why), shared weights, subgraphs, cleanup."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import assert_outputs_close, init, make_model, op_types, run, tensor_input
from onnx import TensorProto, helper, numpy_helper

import onnxlr

FULL_RANK = {"rank_ratio": 1.0, "allow_no_gain": True}
RNG = np.random.default_rng(7)


def weight(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def layer(report, name):
    return next(row for row in report["layers"] if row["name"] == name)


def check_exact(model, feeds, **kwargs):
    new_model, report = onnxlr.optimize(model, **{**FULL_RANK, **kwargs}, verify=False)
    onnx.checker.check_model(new_model, full_check=True)
    assert_outputs_close(run(model, feeds), run(new_model, feeds))
    return new_model, report


def test_constant_node_weight_is_factorized_and_removed():
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight(8, 6))),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("x", [3, 8])], [tensor_input("y", [3, 6])])
    new_model, report = check_exact(model, {"x": weight(3, 8)})
    assert layer(report, "mm")["status"] == "factorized"
    assert "Constant" not in op_types(new_model)  # the folded weight is gone


def test_constant_chain_is_folded():
    # Constant -> Cast(fp16->fp32) -> Transpose -> Reshape -> Identity -> MatMul
    raw = weight(6, 2, 4).astype(np.float16)
    nodes = [helper.make_node("Constant", [], ["raw"], value=numpy_helper.from_array(raw)),
             helper.make_node("Cast", ["raw"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["c"], ["t"], perm=[1, 2, 0]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]),
             helper.make_node("Identity", ["r"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("x", [3, 8])], [tensor_input("y", [3, 6])],
                       [init("shape", np.array([0, -1], dtype=np.int64).reshape(2) * 0 + np.array([8, -1]))])
    new_model, report = check_exact(model, {"x": weight(3, 8)})
    assert layer(report, "mm")["status"] == "factorized"
    assert op_types(new_model) == ["MatMul", "MatMul"]  # the chain was folded away


def test_weight_inside_if_subgraph_and_from_outer_scope():
    inner_w = numpy_helper.from_array(weight(8, 5), "Winner")
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", "Winner"], ["a"], name="then_mm")], "then",
                                   [], [tensor_input("a", [2, 5])], [inner_w])
    else_graph = helper.make_graph([helper.make_node("MatMul", ["x", "Wouter"], ["b"], name="else_mm")], "else",
                                   [], [tensor_input("b", [2, 5])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [tensor_input("x", [2, 8]), tensor_input("cond", [], TensorProto.BOOL)],
                       [tensor_input("y", [2, 5])], [init("Wouter", weight(8, 5))])
    x = weight(2, 8)
    for cond in (True, False):
        new_model, report = check_exact(model, {"x": x, "cond": np.array(cond)})
    assert layer(report, "then_mm")["status"] == "factorized"
    assert layer(report, "else_mm")["status"] == "factorized"


def test_shared_weight_is_factorized_once_for_all_users():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h2", "W"], ["y"], name="mm2"),
             helper.make_node("Relu", ["h"], ["h2"])]
    nodes = [nodes[0], nodes[2], nodes[1]]
    model = make_model(nodes, [tensor_input("x", [4, 8])], [tensor_input("y", [4, 8])], [init("W", weight(8, 8))])
    new_model, report = check_exact(model, {"x": weight(4, 8)})
    assert layer(report, "mm1")["shared_with"] == ["mm2"]
    assert len(new_model.graph.initializer) == 2  # one factor pair, used by both rewritten nodes
    assert op_types(new_model).count("MatMul") == 4


def test_weight_also_read_by_another_op_is_skipped_with_reason():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("ReduceSum", ["W"], ["s"], keepdims=0)]
    model = make_model(nodes, [tensor_input("x", [4, 8])], [tensor_input("y", [4, 8]), tensor_input("s", [])],
                       [init("W", weight(8, 8))])
    _, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    assert layer(report, "mm")["status"] == "skipped"
    assert layer(report, "mm")["reason_code"] == "shared_with_other_op"
    assert "ReduceSum" in layer(report, "mm")["reason"]  # the sentence names the other reader


def test_graph_input_weight_and_output_weight_are_never_changed():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm_input"),
             helper.make_node("MatMul", ["x", "V"], ["z"], name="mm_output")]
    # W is an initializer that is also listed as a graph input (callers may override it).
    model = make_model(nodes, [tensor_input("x", [4, 8]), tensor_input("W", [8, 8])],
                       [tensor_input("y", [4, 8]), tensor_input("z", [4, 8]), tensor_input("V", [8, 8])],
                       [init("V", weight(8, 8)), init("W", weight(8, 8))])
    new_model, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    assert layer(report, "mm_input")["reason_code"] == "graph_input"
    assert layer(report, "mm_output")["reason_code"] == "graph_output"
    assert op_types(new_model) == ["MatMul", "MatMul"]


def test_quantized_and_unsupported_patterns_are_left_alone_with_reasons():
    q = np.clip(RNG.integers(-100, 100, (8, 8)), -128, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm_dq"),
             helper.make_node("Conv", ["img", "Kdw"], ["z"], name="depthwise", group=4),
             helper.make_node("ConvTranspose", ["img", "Kt"], ["t"], name="deconv")]
    model = make_model(
        nodes, [tensor_input("x", [2, 8]), tensor_input("img", [1, 4, 5, 5])],
        [tensor_input("y", [2, 8]), tensor_input("z", [1, 4, 3, 3]), tensor_input("t", [1, 2, 7, 7])],
        [init("Wq", q), init("scale", np.float32(0.01)), init("Kdw", weight(4, 1, 3, 3)), init("Kt", weight(4, 2, 3, 3))])
    new_model, report = onnxlr.optimize(model, rank_ratio=0.25, verify=False)
    assert layer(report, "mm_dq")["reason_code"] == "quantized_weight"
    assert layer(report, "depthwise")["reason_code"] == "depthwise"
    assert layer(report, "deconv")["reason_code"] == "unsupported_op"
    assert op_types(new_model) == op_types(model)


def test_non_finite_and_integer_weights_are_skipped():
    bad = weight(8, 8)
    bad[0, 0] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm_nan"),
             helper.make_node("MatMul", ["i", "Wi"], ["z"], name="mm_int")]
    model = make_model(nodes, [tensor_input("x", [2, 8]), tensor_input("i", [2, 8], TensorProto.INT32)],
                       [tensor_input("y", [2, 8]), tensor_input("z", [2, 8], TensorProto.INT32)],
                       [init("W", bad), init("Wi", np.ones((8, 8), np.int32))])
    _, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    assert layer(report, "mm_nan")["reason_code"] == "non_finite_weight"
    assert layer(report, "mm_int")["reason_code"] == "dtype"


def test_rank_three_weight_and_activation_matmul_are_skipped():
    nodes = [helper.make_node("MatMul", ["x", "W3"], ["y"], name="batched"),
             helper.make_node("MatMul", ["x", "xt"], ["z"], name="attention"),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1])]
    nodes = [nodes[0], nodes[2], nodes[1]]
    model = make_model(nodes, [tensor_input("x", [2, 3, 4])],
                       [tensor_input("y", [2, 3, 5]), tensor_input("z", [2, 3, 3])], [init("W3", weight(2, 4, 5))])
    _, report = onnxlr.optimize(model, **FULL_RANK, verify=False)
    assert layer(report, "batched")["reason_code"] == "weight_rank"
    assert layer(report, "attention")["reason_code"] == "runtime_weight"
    assert layer(report, "attention")["reason"] == "no constant weight: both inputs are computed at run time"


def test_output_keeps_names_opset_and_records_metadata():
    node = helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="head", transB=1)
    model = make_model([node], [tensor_input("x", [2, 64])], [tensor_input("logits", [2, 32])],
                       [init("W", weight(32, 64)), init("b", weight(32))], opset=13)
    new_model, report = onnxlr.optimize(model, rank_ratio=0.25, verify=False)
    assert [o.name for o in new_model.graph.output] == ["logits"]
    assert [(o.domain, o.version) for o in new_model.opset_import] == [("", 13)]
    meta = {p.key: p.value for p in new_model.metadata_props}
    assert meta["onnxlr.version"] == onnxlr.__version__
    assert '"head": 8' in meta["onnxlr.ranks"]
    assert {t.name for t in new_model.graph.initializer} == {"W_lr_a", "W_lr_b", "b"}


def test_same_input_gives_byte_identical_output(tmp_path):
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [tensor_input("x", [2, 64])], [tensor_input("y", [2, 48])], [init("W", weight(64, 48))])
    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    outputs = []
    for index in range(2):
        new_model, _ = onnxlr.optimize(str(source), energy=0.9, verify=False)
        onnxlr.save(new_model, tmp_path / f"out{index}.onnx")
        outputs.append((tmp_path / f"out{index}.onnx").read_bytes())
    assert outputs[0] == outputs[1]


def test_api_returns_the_kind_it_was_given():
    import onnx_graphsurgeon as gs

    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [tensor_input("x", [2, 16])], [tensor_input("y", [2, 16])], [init("W", weight(16, 16))])
    before = model.SerializeToString()
    as_proto, _ = onnxlr.optimize(model, rank=2, verify=False)
    assert isinstance(as_proto, onnx.ModelProto)
    assert model.SerializeToString() == before  # the caller's model is untouched
    as_ir, _ = onnxlr.optimize(ir.serde.deserialize_model(model), rank=2, verify=False)
    assert isinstance(as_ir, ir.Model)
    as_gs, _ = onnxlr.optimize(gs.import_onnx(model), rank=2, verify=False)
    assert isinstance(as_gs, gs.Graph)
    assert [n.op for n in as_gs.nodes] == ["MatMul", "MatMul"]


def test_each_pass_runs_alone_on_an_ir_model():
    from onnxlr.passes import ConvFactorization, MatMulFactorization

    nodes = [helper.make_node("Conv", ["img", "K"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("img", [1, 8, 4, 4])], [tensor_input("y", [1, 8])],
                       [init("K", weight(16, 8, 3, 3)), init("W", weight(64, 8))])
    ir_model = ir.serde.deserialize_model(model)
    result = MatMulFactorization(rank=2)(ir_model)
    assert result.modified
    assert [n.op_type for n in result.model.graph] == ["Conv", "Flatten", "MatMul", "MatMul"]
    converted, report = ConvFactorization(rank=2).apply(model, verify=False)
    assert op_types(converted) == ["Conv", "Conv", "Flatten", "MatMul"]
    assert {row["op_type"] for row in report["layers"]} == {"Conv"}
    # The deprecated location (onnxlr.passes) and the new one are the same classes.
    assert MatMulFactorization is onnxlr.MatMulFactorization


def test_the_factorization_pass_applies_the_whole_rule_set():
    nodes = [helper.make_node("Conv", ["img", "K"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("img", [1, 8, 4, 4])], [tensor_input("y", [1, 8])],
                       [init("K", weight(16, 8, 3, 3)), init("W", weight(64, 8))])
    factorization = onnxlr.FactorizationPass(rank=2)
    result = factorization(ir.serde.deserialize_model(model))
    assert result.modified
    assert [n.op_type for n in result.model.graph] == ["Conv", "Conv", "Flatten", "MatMul", "MatMul"]
    assert [row["status"] for row in factorization.report["layers"]] == ["factorized", "factorized"]
    # Nothing to factorize: the pass says it did not modify the model.
    untouched = onnxlr.FactorizationPass(rank=2, ops=("Gemm",))(ir.serde.deserialize_model(model))
    assert not untouched.modified


def test_the_factorization_pass_declares_its_pre_and_postconditions():
    """onnx-ir's requires/ensures: bad settings fail before the model is touched (an OnnxlrError naming the
    keyword that a PassManager sees as a PreconditionError); a model grown past its input fails the postcondition."""
    from onnxlr.api import InvalidPassSettings
    from onnxlr.errors import OnnxlrError

    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [tensor_input("x", [2, 64])],
                       [tensor_input("y", [2, 64])], [init("W", weight(64, 64))])
    before = ir.serde.deserialize_model(model)
    for bad in ({"rank_ratio": 2.0}, {"rank_ratio": 0.5, "quantize": "int8"}):
        with pytest.raises(ir.passes.PreconditionError) as caught:
            onnxlr.FactorizationPass(**bad)(before)
        assert isinstance(caught.value, InvalidPassSettings) and isinstance(caught.value, OnnxlrError)
        assert "rank_ratio" in str(caught.value) or "quantize" in str(caught.value)
    assert [n.op_type for n in before.graph] == ["MatMul"]  # untouched
    factorization = onnxlr.FactorizationPass(rank=2)
    result = factorization(before)
    assert result.modified
    factorization.ensures(result.model)  # holds: 64x2 + 2x64 < 64x64
    result.model.graph.initializers["W_lr_a"].const_value = ir.tensor(np.zeros((64, 128), dtype=np.float32))
    with pytest.raises(ir.passes.PostconditionError, match="more than the input's"):
        factorization.ensures(result.model)


def test_weight_used_inside_a_loop_body():
    # v <- v · W, three times; W lives in the main graph (outer scope of the body).
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "W"], ["v_out"], name="loop_mm")],
        "body",
        [tensor_input("i", [], TensorProto.INT64), tensor_input("cond_in", [], TensorProto.BOOL),
         tensor_input("v_in", [2, 8])],
        [tensor_input("cond_out", [], TensorProto.BOOL), tensor_input("v_out", [2, 8])])
    nodes = [helper.make_node("Loop", ["trips", "cond", "v0"], ["v"], name="loop", body=body)]
    model = make_model(nodes, [tensor_input("v0", [2, 8])], [tensor_input("v", [2, 8])],
                       [init("W", weight(8, 8) / 3), init("trips", np.array(3, dtype=np.int64)),
                        init("cond", np.array(True))])
    new_model, report = check_exact(model, {"v0": weight(2, 8)})
    assert layer(report, "loop_mm")["status"] == "factorized"
    body_ops = [n.op_type for n in new_model.graph.node[0].attribute[0].g.node]
    assert body_ops.count("MatMul") == 2
