"""`--methods svd,joint`: coupled MLP pairs compressed together, chosen where they lose less, rewritten exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import assert_outputs_close, init, make_model, onnxlr_cli, run, tensor_input
from onnx import TensorProto, helper

import onnxlr
from onnxlr.coupled import joint, pairs
from onnxlr.coupled import plans as coupled
from onnxlr.model_io.io import load

RNG = np.random.default_rng(16)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws the same data whichever tests ran before it in this worker (xdist reorders them)."""
    global RNG
    RNG = np.random.default_rng(16)
D_IN, WIDTH = 32, 128


def redundant_mlp(activation="Relu", gemm=False):
    """x -> up (+b1) -> activation -> down (+b2), half of the inner neurons near-copies of the other half."""
    base = RNG.standard_normal((D_IN, WIDTH // 2)).astype(np.float32) / 6
    w1 = np.concatenate([base, base * 1.01], axis=1)
    b1 = (RNG.standard_normal(WIDTH) * 0.1).astype(np.float32)
    w2 = (RNG.standard_normal((WIDTH, D_IN)) / 10).astype(np.float32)
    b2 = (RNG.standard_normal(D_IN) * 0.1).astype(np.float32)
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["hb"], name="up", transB=1),
                 helper.make_node(activation, ["hb"], ["z"]),
                 helper.make_node("Gemm", ["z", "W2", "b2"], ["y"], name="down", transB=1)]
        weights = [init("W1", np.ascontiguousarray(w1.T)), init("b1", b1), init("W2", np.ascontiguousarray(w2.T)),
                   init("b2", b2)]
        x = tensor_input("x", [8, D_IN])
    else:
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
                 helper.make_node("Add", ["b1", "h"], ["hb"], name="up_bias"),
                 helper.make_node(activation, ["hb"], ["z"]),
                 helper.make_node("MatMul", ["z", "W2"], ["y0"], name="down"),
                 helper.make_node("Add", ["y0", "b2"], ["y"], name="down_bias")]
        weights = [init("W1", w1), init("b1", b1), init("W2", w2), init("b2", b2)]
        x = tensor_input("x", ["n", D_IN])
    return make_model(nodes, [x], [tensor_input("y", None)], weights, opset=20)


def batches(count, rows=8):
    return [{"x": RNG.standard_normal((rows, D_IN)).astype(np.float32)} for _ in range(count)]


def relative_error(model, candidate, feeds):
    reference, = run(model, feeds)
    out, = run(candidate, feeds)
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("activation,gemm", [("Relu", False), ("Gelu", False), ("Tanh", True)])
def test_joint_pair_is_chosen_where_it_loses_less(activation, gemm):
    model = redundant_mlp(activation, gemm)
    calibration, heldout = batches(24), batches(4)[0]  # more samples than the 128 neurons the refit weighs
    svd_model, svd_report = onnxlr.optimize(model, calibration=calibration, param_ratio=0.5, methods=("svd",), verify=False)
    joint_model, report = onnxlr.optimize(model, calibration=calibration, param_ratio=0.5, methods=("svd", "joint"), verify=False)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["up"]["method"] == rows["down"]["method"] == "joint"
    assert rows["up"]["partner"] == "down" and rows["down"]["partner"] == "up"
    assert rows["up"]["rank"] == rows["down"]["rank"] < WIDTH
    # At no more parameters than the per-matrix plan, and the rows add up to the totals.
    totals = report["totals"]
    assert totals["params_after"] <= svd_report["totals"]["params_after"]
    freed = sum(row["params_before"] - row["params_after"] for row in report["layers"])
    assert freed == totals["params_before"] - totals["params_after"]
    assert relative_error(model, joint_model, heldout) < 0.5 * relative_error(model, svd_model, heldout)
    onnx.checker.check_model(joint_model, full_check=True)
    assert len(joint_model.graph.node) == len(model.graph.node)  # slicing adds no node
    metadata = {p.key: p.value for p in joint_model.metadata_props}
    assert "joint" in metadata["onnxlr.methods"] and '"up"' in metadata["onnxlr.joint"]


@pytest.mark.parametrize("activation,gemm", [("Relu", False), ("Gelu", False), ("Tanh", True)])
def test_keeping_every_neuron_reproduces_the_outputs(activation, gemm):
    """The rewrite itself, with a fit that keeps all D neurons: exact (joint.select_and_refit returns W2 as is)."""
    model = redundant_mlp(activation, gemm)
    ir_model = load(model).model
    (pair,), _ = pairs.find_mlp_pairs(ir_model)
    fit = joint.select_and_refit(pair.down.matrix(), pair.down.bias_array(), np.eye(WIDTH + 1), WIDTH)
    plan = coupled.PairPlan(pair, ups=[], down=None, fit=fit)
    coupled.rewrite(ir_model, [plan])
    rewritten = ir.to_proto(ir_model)
    feeds = batches(1)[0]
    assert_outputs_close(run(model, feeds), run(rewritten, feeds), rtol=1e-5, atol=1e-6)


def test_kept_neurons_slice_both_weights_and_the_first_bias():
    model = redundant_mlp()
    joint_model, report = onnxlr.optimize(model, calibration=batches(6), param_ratio=0.5, methods=("svd", "joint"), verify=False)
    kept = report["layers"][0]["rank"]
    shapes = {t.name: tuple(t.dims) for t in joint_model.graph.initializer}
    assert sorted(shapes.values()) == sorted([(D_IN, kept), (kept,), (kept, D_IN), (D_IN,)])


def test_joint_needs_calibration_data(caplog):
    model = redundant_mlp()
    _, report = onnxlr.optimize(model, param_ratio=0.5, methods=("svd", "joint"), verify=False)
    assert {row["method"] for row in report["layers"]} <= {"svd", None}
    assert "needs --calibration" in caplog.text


def test_joint_methods_are_checked():
    with pytest.raises(onnxlr.OnnxlrError, match="methods"):
        onnxlr.optimize(redundant_mlp(), methods=("joint",), verify=False)


def mlp_then_head(activation="Gelu"):
    """The redundant pair, then a plain MatMul head that is no pair: the budget is shared between them."""
    model = redundant_mlp(activation)
    low_rank = RNG.standard_normal((D_IN, 6)) @ RNG.standard_normal((6, D_IN)) / 5  # worth factorizing
    head = init("W3", (low_rank + RNG.standard_normal((D_IN, D_IN)) / 50).astype(np.float32))
    model.graph.initializer.append(head)
    model.graph.output[0].name = "out"
    model.graph.node.append(helper.make_node("MatMul", ["y", "W3"], ["out"], name="head"))
    onnx.checker.check_model(model)
    return model


def cosine(model, candidate, feeds_list):
    reference = np.concatenate([run(model, f)[0] for f in feeds_list]).ravel()
    out = np.concatenate([run(candidate, f)[0] for f in feeds_list]).ravel()
    return float(reference @ out / np.linalg.norm(reference) / np.linalg.norm(out))


@pytest.mark.parametrize("budget", ["param_budget", "mac_budget"])
def test_budget_allocates_to_joint_pairs(budget):
    """With a whole-model budget the pair competes as one candidate; the written model keeps the budget."""
    model = mlp_then_head()
    calibration, heldout = batches(8), batches(4)
    svd_model, svd_report = onnxlr.optimize(model, calibration=calibration, methods=("svd",), **{budget: 0.5}, verify=False)
    joint_model, report = onnxlr.optimize(model, calibration=calibration, methods=("svd", "joint"), **{budget: 0.5}, verify=False)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["up"]["method"] == rows["down"]["method"] == "joint" and rows["up"]["rank"] < WIDTH
    (pair,) = report["calibration"]["pairs"]["found"]
    assert pair["outcome"] == "joint" and pair["kept"] == rows["up"]["rank"]
    assert pair["joint_error"] <= pair["per_matrix_error"]
    if budget == "param_budget":  # the budget counts the weights the targets multiply (the Add biases stay)
        before, after = (sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) == 2)
                         for m in (model, joint_model))
    else:
        before, after = (sum(row[f"macs_{when}"] for row in report["layers"]) for when in ("before", "after"))
    assert after <= 0.5 * before + 1
    assert cosine(model, joint_model, heldout) > cosine(model, svd_model, heldout)
    assert len(joint_model.graph.node) <= len(svd_model.graph.node)


def test_target_cosine_search_measures_the_joint_model_it_writes():
    """The search feeds the joint fit (zero rows at dropped neurons, refitted bias) to onnxruntime: what it
    measures for the chosen budget is what the written model gives on the same held-out samples."""
    model = mlp_then_head()
    calibration, heldout = batches(8), batches(3)
    result, report = onnxlr.optimize(model, calibration=calibration, heldout=heldout, target_cosine=0.98,
                                     methods=("svd", "joint"), verify=False)
    assert any(row["method"] == "joint" for row in report["layers"])
    trace = report["calibration"]["search"]
    chosen = min((t for t in trace if t["cosine"] >= 0.98), key=lambda t: t["budget"])
    assert cosine(model, result, heldout) == pytest.approx(chosen["cosine"], abs=2e-5)
    assert chosen["cosine"] >= 0.98


def test_joint_with_compensation():
    """--compensate refits the per-matrix layers after a joint pair on the inputs the pair now gives them."""
    model = mlp_then_head()
    calibration, heldout = batches(8), batches(3)
    plain, _ = onnxlr.optimize(model, calibration=calibration, param_budget=0.4, methods=("svd", "joint"), verify=False)
    refitted, report = onnxlr.optimize(model, calibration=calibration, param_budget=0.4, methods=("svd", "joint"),
                                       compensate=True, verify=False)
    assert report["calibration"]["refitted"] >= 1
    assert cosine(model, refitted, heldout) >= cosine(model, plain, heldout) - 1e-3


def test_cli_methods_flag(tmp_path):
    source, target, calibration = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    onnx.save(redundant_mlp(), str(source))
    np.savez(calibration, x=np.concatenate([b["x"] for b in batches(6)]))
    result = onnxlr_cli("optimize", source, target, "--param-ratio", "0.5", "--methods", "svd,joint", "--calibration",
                        calibration, "--no-gate")
    assert result.returncode == 0, result.stderr
    assert "joint with" in result.stdout + result.stderr
    assert target.exists() and target.stat().st_size < source.stat().st_size
    bad = onnxlr_cli("optimize", source, target, "--methods", "svd,magic")
    assert bad.returncode == 2 and "--methods" in bad.stderr and "Traceback" not in bad.stderr


def test_model_without_pairs_is_unchanged_by_joint():
    """A model with no coupled pair: joint changes nothing."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="only")]
    model = make_model(nodes, [tensor_input("x", [4, 16], TensorProto.FLOAT)], [tensor_input("y", None)],
                       [init("W", RNG.standard_normal((16, 16)).astype(np.float32))])
    calibration = [{"x": RNG.standard_normal((4, 16)).astype(np.float32)}]
    plain, _ = onnxlr.optimize(model, calibration=calibration, rank_ratio=0.25, methods=("svd",), verify=False)
    with_joint, _ = onnxlr.optimize(model, calibration=calibration, rank_ratio=0.25, methods=("svd", "joint"), verify=False)
    assert plain.graph.SerializeToString() == with_joint.graph.SerializeToString()  # the settings differ


def test_a_chain_of_pairs_gives_each_layer_one_pair():
    """linear -> relu -> linear -> relu -> linear: the middle layer ends one pair and starts the next; it
    joins the first only, and the rewrite stays exact in structure (runs, same outputs shape)."""
    weights = [init(f"W{i}", (RNG.standard_normal((D_IN, D_IN)) / 4).astype(np.float32)) for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="fc0"), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "W1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "W2"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor_input("x", ["n", D_IN])], [tensor_input("y", None)], weights, opset=20)
    found, _ = pairs.find_mlp_pairs(load(model).model)
    assert [(p.up.node.name, p.down.node.name) for p in found] == [("fc0", "fc1"), ("fc1", "fc2")]
    result, report = onnxlr.optimize(model, calibration=batches(8), param_budget=0.5, methods=("svd", "joint"), verify=False)
    partners = {row["name"]: row["partner"] for row in report["layers"] if row["method"] == "joint"}
    assert partners in ({"fc0": "fc1", "fc1": "fc0"}, {})
    assert "fc2" not in partners
    pairs_report = report["calibration"]["pairs"]
    assert [(p["up"], p["down"], p["kind"]) for p in pairs_report["found"]] == [(["fc0"], "fc1", "mlp")]
    assert pairs_report["not_pairs"] == [{"node": "fc1", "reason": "a layer already belongs to the pair before it"}]
    feeds = batches(1)[0]
    assert run(result, feeds)[0].shape == run(model, feeds)[0].shape


def test_joint_is_the_default_with_calibration_data_only(caplog):
    """No --methods: joint pairs with calibration data, per-matrix without (and no warning then)."""
    model = redundant_mlp()
    _, with_data = onnxlr.optimize(model, calibration=batches(6), param_ratio=0.5, verify=False)
    assert {row["method"] for row in with_data["layers"]} == {"joint"}
    with caplog.at_level("INFO", logger="onnxlr"):
        _, without = onnxlr.optimize(model, param_ratio=0.5, verify=False)
    assert {row["method"] for row in without["layers"]} == {"svd"}
    assert "needs --calibration" not in caplog.text
    assert "1 coupled pairs could be compressed jointly with --calibration" in caplog.text
    _, explicit = onnxlr.optimize(model, calibration=batches(6), param_ratio=0.5, methods=("svd",), verify=False)
    assert {row["method"] for row in explicit["layers"]} == {"whitened"}


def test_correlation_from_the_calibration_statistics_equals_its_own_pass(monkeypatch):
    """The augmented correlation built from the down layer's Gram and sum (no second pass) gives the same
    model as the one streamed in a pass of its own."""
    model, calibration = mlp_then_head(), batches(8)
    shared, shared_report = onnxlr.optimize(model, calibration=calibration, param_budget=0.5, verify=False)
    monkeypatch.setattr(coupled, "_has_moments", lambda statistics: False)
    own, own_report = onnxlr.optimize(model, calibration=calibration, param_budget=0.5, verify=False)
    assert [r["rank"] for r in shared_report["layers"]] == [r["rank"] for r in own_report["layers"]]
    assert any(r["method"] == "joint" for r in own_report["layers"])
    for a, b in zip(shared.graph.initializer, own.graph.initializer):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), rtol=1e-4, atol=1e-5)


def test_a_candidate_whose_intermediate_is_read_elsewhere_is_reported_with_why():
    model = redundant_mlp()
    model.graph.output.append(onnx.helper.make_value_info("z", onnx.TypeProto()))  # the activation leaks out
    _, report = onnxlr.optimize(model, calibration=batches(6), param_budget=0.5, verify=False)
    assert {row["method"] for row in report["layers"]} <= {"whitened", None}
    (entry,) = report["calibration"]["pairs"]["not_pairs"]
    assert entry["node"] == "up" and "graph output" in entry["reason"]
    assert report["calibration"]["pairs"]["found"] == []
