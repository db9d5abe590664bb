"""LSTM, GRU and RNN: the input weight W is factorized exactly (X·A feeds the op, B is its new W); R is left alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import assert_outputs_close, init, make_model, onnxlr_cli, op_types, run, tensor_input
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnxlr.passes import RULES

import onnxlr
from onnxlr.calibrate import calibration
from onnxlr.model_io.io import load

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SEQ, BATCH = 5, 3


def recurrent_model(op: str, *, direction: str = "forward", layout: int = 0, input_size: int = 6, hidden: int = 4,
                    bias: bool = False, initial: bool = False, lengths: bool = False, constant_w: bool = True,
                    w_rank: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """One `op` node with random weights; every output (Y, Y_h and for LSTM Y_c) is a graph output.

    `w_rank`: the directions' stacked input matrix [W_0ᵀ | W_1ᵀ] has this rank (a factorization at it is exact)."""
    rng = np.random.default_rng(seed)
    directions = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    x_shape = [SEQ, BATCH, input_size] if layout == 0 else [BATCH, SEQ, input_size]
    state_shape = [directions, BATCH, hidden] if layout == 0 else [BATCH, directions, hidden]
    inputs = [tensor_input("X", x_shape)]
    inits = [init("R", (rng.standard_normal((directions, gates * hidden, hidden)) * 0.3).astype(np.float32))]
    w = (rng.standard_normal((directions, gates * hidden, input_size)) * 0.3).astype(np.float32)
    if w_rank is not None:
        stacked = rng.standard_normal((input_size, w_rank)) @ rng.standard_normal((w_rank, directions * gates * hidden))
        w = (stacked.reshape(input_size, directions, gates * hidden).transpose(1, 2, 0) * 0.05).astype(np.float32)
    if constant_w:
        inits.append(init("W", w))
    else:
        inputs.append(tensor_input("W", list(w.shape)))
    names = ["X", "W", "R", "", "", ""]
    if bias:
        inits.append(init("B", rng.standard_normal((directions, 2 * gates * hidden)).astype(np.float32)))
        names[3] = "B"
    if lengths:
        inits.append(init("L", np.array([SEQ, 2, 4][:BATCH], dtype=np.int32)))
        names[4] = "L"
    if initial:
        inits.append(init("H0", rng.standard_normal(state_shape).astype(np.float32)))
        names[5] = "H0"
        if op == "LSTM":
            inits.append(init("C0", rng.standard_normal(state_shape).astype(np.float32)))
            names.append("C0")
    while names[-1] == "":
        names.pop()
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outputs, name="rnn", hidden_size=hidden, direction=direction, layout=layout)
    y_shape = [SEQ, directions, BATCH, hidden] if layout == 0 else [BATCH, SEQ, directions, hidden]
    graph_outputs = [tensor_input("Y", y_shape)] + [tensor_input(name, state_shape) for name in outputs[1:]]
    return make_model([node], inputs, graph_outputs, inits)


def feeds(model: onnx.ModelProto, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    result = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        result[value.name] = rng.standard_normal(shape).astype(np.float32)
    return result


def outputs(model: onnx.ModelProto, inputs: dict, layout: int = 0) -> list:
    """onnxruntime; layout 1 (batch first), which onnxruntime's CPU kernels refuse, on onnx's reference evaluator."""
    if layout == 0:
        return run(model, inputs)
    return [np.asarray(value) for value in ReferenceEvaluator(model).run(None, inputs)]


def rows(report: dict) -> dict:
    return {row["name"]: row for row in report["layers"]}


CASES = [(op, direction, layout) for op in ("LSTM", "GRU") for direction in ("forward", "reverse", "bidirectional")
         for layout in (0, 1)] + [("RNN", "bidirectional", 0), ("RNN", "forward", 1)]


@pytest.mark.parametrize("op,direction,layout", CASES)
def test_full_rank_is_exact(op, direction, layout):
    # (onnx's reference evaluator ignores sequence_lens: layout 1 goes without them.)
    model = recurrent_model(op, direction=direction, layout=layout, bias=True, initial=True, lengths=layout == 0)
    out, report = onnxlr.optimize(model, rank_ratio=1, allow_no_gain=True, verify=False)
    row = rows(report)["rnn"]
    assert row["status"] == "factorized" and row["op_type"] == op and row["scheme"] == "input"
    assert sorted(op_types(out)) == sorted(["MatMul", op])
    new = next(node for node in out.graph.node if node.op_type == op)
    assert list(new.input[2:]) == list(next(n for n in model.graph.node).input[2:])  # R, B, lengths, states
    directions = 2 if direction == "bidirectional" else 1
    w = next(t for t in out.graph.initializer if t.name == new.input[1])
    width = GATES[op] * 4
    assert list(w.dims) == [directions, width, min(6, directions * width)]  # full rank of the 6 x dirs·width view
    inputs = feeds(model)
    reference = outputs(model, inputs, layout)
    assert len(reference) == (3 if op == "LSTM" else 2)
    assert_outputs_close(reference, outputs(out, inputs, layout), rtol=1e-4, atol=1e-4)


def test_plain_lstm_without_optional_inputs_is_exact():
    model = recurrent_model("LSTM")
    out, report = onnxlr.optimize(model, rank_ratio=1, allow_no_gain=True, verify=False)
    assert rows(report)["rnn"]["status"] == "factorized"
    inputs = feeds(model)
    assert_outputs_close(run(model, inputs), run(out, inputs))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_low_rank_on_a_wide_input_gains(op):
    model = recurrent_model(op, direction="bidirectional", input_size=64, hidden=8, bias=True, w_rank=4)
    out, report = onnxlr.optimize(model, rank=4, verify=False)
    row = rows(report)["rnn"]
    directions, width = 2, GATES[op] * 8
    assert row["status"] == "factorized" and row["rank"] == 4
    assert row["params_before"] == directions * width * 64
    assert row["params_after"] == 4 * (64 + directions * width) < row["params_before"]
    assert row["macs_after"] < row["macs_before"] == SEQ * BATCH * directions * width * 64
    new = next(node for node in out.graph.node if node.op_type == op)
    assert [list(t.dims) for t in out.graph.initializer if t.name == new.input[1]] == [[directions, width, 4]]
    inputs = feeds(model)
    assert_outputs_close(run(model, inputs), run(out, inputs))  # the stacked W has rank 4: exact at rank 4


def test_narrow_input_has_no_gain():
    # input 6, 16 columns: rank 5 keeps 5·(6 + 16) = 110 >= 96 parameters, so it stays dense.
    _, report = onnxlr.optimize(recurrent_model("LSTM"), rank=5, verify=False)
    assert rows(report)["rnn"]["reason_code"] == "no_gain"


def test_runtime_weight_is_skipped():
    model = recurrent_model("GRU", constant_w=False)
    out, report = onnxlr.optimize(model, verify=False)
    row = rows(report)["rnn"]
    assert row["status"] == "skipped" and row["reason_code"] == "runtime_weight"
    assert op_types(out) == ["GRU"]


def test_constant_node_weight_is_found():
    model = recurrent_model("LSTM", input_size=32)
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value=w))
    out, report = onnxlr.optimize(model, rank_ratio=1, allow_no_gain=True, verify=False)
    assert rows(report)["rnn"]["status"] == "factorized"
    inputs = feeds(model)
    assert_outputs_close(run(model, inputs), run(out, inputs))


def test_ops_setting_leaves_recurrent_nodes_out_and_default_records_old_ops():
    model = recurrent_model("LSTM", input_size=64, hidden=8)
    out, report = onnxlr.optimize(model, ops=("MatMul",), rank=2, verify=False)
    assert "rnn" not in rows(report) and op_types(out) == ["LSTM"]
    out, _ = onnxlr.optimize(model, rank=2, verify=False)
    settings = json.loads(dict((p.key, p.value) for p in out.metadata_props)["onnxlr.settings"])
    assert settings["ops"] == ["MatMul", "Gemm", "Conv"]


def test_calibration_skips_recurrent_rules():
    assert not RULES["LSTM"].calibrated and RULES["MatMul"].calibrated
    model = recurrent_model("LSTM", input_size=16)
    assert calibration.probes(load(model).model) == []


def test_calibrated_optimize_factorizes_with_plain_svd(tmp_path):
    model = recurrent_model("GRU", input_size=64, hidden=8)
    data = [feeds(model, seed) for seed in range(4)]
    out, report = onnxlr.optimize(model, rank=4, calibration=data, verify=False)
    row = rows(report)["rnn"]
    assert row["status"] == "factorized" and row["method"] == "svd"


def test_analyze_lists_recurrent_nodes(tmp_path):
    path = tmp_path / "lstm.onnx"
    onnx.save(recurrent_model("LSTM", direction="bidirectional", input_size=64, hidden=8), path)
    result = onnxlr_cli("analyze", path, "--json", tmp_path / "a.json")
    assert result.returncode == 0, result.stderr
    layers = json.loads((tmp_path / "a.json").read_text())["layers"]
    assert [(layer["name"], layer["op_type"]) for layer in layers] == [("rnn", "LSTM")]
    assert layers[0]["views"][0]["scheme"] == "input"
    assert "rnn" in result.stdout


def test_model_macs_count_the_recurrent_op():
    model = recurrent_model("LSTM", direction="bidirectional", input_size=64, hidden=8)
    _, report = onnxlr.optimize(model, rank=4, verify=False)
    cost = report["cost"]
    width = 2 * 4 * 8
    before = SEQ * BATCH * width * (64 + 8)
    after = SEQ * BATCH * (64 * 4 + width * (4 + 8))
    assert (cost["before"]["macs"], cost["after"]["macs"]) == (before, after)


def test_cli_optimizes_and_verifies_an_lstm(tmp_path):
    path, out = tmp_path / "lstm.onnx", tmp_path / "lstm-lr.onnx"
    model = recurrent_model("LSTM", direction="bidirectional", input_size=64, hidden=8, bias=True, w_rank=4)
    onnx.save(model, path)
    result = onnxlr_cli("optimize", path, out, "--ops", "LSTM", "--rank", "4", "--report", tmp_path / "r.json", "-q")
    assert result.returncode == 0, result.stderr
    row = rows(json.loads((tmp_path / "r.json").read_text()))["rnn"]
    assert row["status"] == "factorized" and row["params_after"] < row["params_before"]
    assert sorted(op_types(onnx.load(out))) == ["LSTM", "MatMul"]
    inputs = feeds(model)
    assert_outputs_close(run(model, inputs), run(onnx.load(out), inputs))  # W has rank 4: exact
