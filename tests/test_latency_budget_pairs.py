"""--latency-budget with the default methods (issue 30): coupled pairs compete for the measured time with the other
layers, also where a layer of a pair cannot be timed (dims unknown at the shapes given, or missing from a table).

Plans are made on latency tables whose times the test sets (deterministic whatever this machine's noise); real
timing is used only where any times give a plan. Tests assert what is planned and written, never a timing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import init, make_model, onnxlr_cli, run, tensor_input
from onnx import helper
from test_coupled import D_IN, WIDTH, batches, redundant_mlp

import onnxlr
from onnxlr.model_io.io import load
from onnxlr.timing import latency

SHAPES = {"x": (8, D_IN)}  # the calibration batches' shape: the tables are keyed at it
BUDGET = 0.6


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test times into its own cache folder: nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("ONNXLR_CACHE_DIR", str(tmp_path / "cache"))


def opaque_pair() -> onnx.ModelProto:
    """The redundant MLP pair behind a Reshape to a computed shape (its input dims are unknown to shape inference,
    so neither layer of the pair can be timed), beside a layer `side` that reads x directly (timed)."""
    base = redundant_mlp()
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]), helper.make_node("Abs", ["x_shape"], ["x_dims"]),
             helper.make_node("Reshape", ["x", "x_dims"], ["x_opaque"], name="opaque")]
    for node in base.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if copy.name == "up":
            copy.input[0] = "x_opaque"
        nodes.append(copy)
    rng = np.random.default_rng(3)
    side = (rng.standard_normal((D_IN, 64)) * 0.9 ** np.arange(64)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", ["x", "Wside"], ["y_side"], name="side"))
    return make_model(nodes, list(base.graph.input), [tensor_input("y", None), tensor_input("y_side", None)],
                      [*base.graph.initializer, init("Wside", side)], opset=20)


def crafted_table(model: onnx.ModelProto, path, drop: str | None = None) -> None:
    """Export the model's table (real keys), then set every time: originals 1 ms, pairs 0.2 ms + 0.005 ms a rank
    (each rank a table holds is faster than the original, and time grows with the rank). `drop`: leave out the
    entries of the layers whose key contains it (they cannot be timed from the table)."""
    latency.export_table(load(model).model, SHAPES, path)
    table = json.loads(path.read_text())
    entries = {}
    for key in table["entries"]:
        if drop is not None and drop in key:
            continue
        entries[key] = 1.0 if key.endswith("|original") else 0.2 + int(key.rsplit("|r", 1)[1]) / 200
    table["entries"] = entries
    path.write_text(json.dumps(table))


def rows(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["layers"]}


def check_plan(model: onnx.ModelProto, result: onnx.ModelProto, report: dict) -> dict[str, dict]:
    """The written model is valid and runs; every target row is joint, factorized, or dense with a reason; the
    planned time keeps within the budget."""
    onnx.checker.check_model(result, full_check=True)
    feeds = batches(1)[0]
    for before, after in zip(run(model, feeds), run(result, feeds)):
        assert after.shape == before.shape and np.all(np.isfinite(after))
    by_name = rows(report)
    for name in ("up", "down"):
        row = by_name[name]
        assert row["method"] == "joint" or row["status"] == "factorized" or row["reason"], row
    assert (by_name["up"]["method"] == "joint") == (by_name["down"]["method"] == "joint")
    plan = report["latency"]
    assert report["settings"]["objective"] == "latency"
    assert plan["planned_ms"] <= BUDGET * plan["targets_ms"] + 1e-9
    return by_name


def test_a_pair_that_cannot_be_timed_stays_whole_and_the_other_layers_take_the_budget(tmp_path):
    model = opaque_pair()
    crafted_table(model, tmp_path / "t.json")
    result, report = onnxlr.optimize(model, calibration=batches(6), latency_budget=BUDGET, input_shapes=SHAPES,
                                     latency_table=str(tmp_path / "t.json"), verify=False)
    by_name = check_plan(model, result, report)
    assert by_name["side"]["status"] == "factorized" and by_name["side"]["pair_ms"] is not None
    for name in ("up", "down"):  # no measured time to price narrowing it by: kept whole, as if untimed alone
        assert by_name[name]["method"] != "joint" and by_name[name]["status"] != "factorized"
        assert by_name[name]["reason"].startswith("not timed: its input")
    assert report["latency"]["timed_layers"] == 1
    pairs = report["calibration"]["pairs"]["found"]
    assert [(p["up"], p["down"], p["chosen"]) for p in pairs] == [(["up"], "down", False)]
    feeds = batches(1)[0]
    np.testing.assert_array_equal(run(result, feeds)[0], run(model, feeds)[0])  # the pair's output is untouched


def test_a_pair_with_one_untimed_layer_is_priced_by_the_timed_one(tmp_path):
    """The down layer is missing from the table: the pair's time is its up layer's, at the kept share."""
    model = redundant_mlp()
    crafted_table(model, tmp_path / "t.json", drop=f"c{WIDTH}x{D_IN}")  # the down layer's weight
    result, report = onnxlr.optimize(model, calibration=batches(6), latency_budget=BUDGET, input_shapes=SHAPES,
                                     latency_table=str(tmp_path / "t.json"), verify=False)
    by_name = check_plan(model, result, report)
    assert report["latency"]["timed_layers"] == 1  # the up layer alone
    if by_name["up"]["method"] == "joint":  # narrowed to at most the budget's share of the up layer's time
        assert by_name["up"]["rank"] <= BUDGET * WIDTH
    else:
        assert "not timed" in by_name["down"]["reason"]
        assert by_name["up"]["status"] == "factorized" or by_name["up"]["reason"]


def test_any_measured_times_give_a_plan_with_the_default_methods():
    """Real timing (any times): every layer of the pair timed, the pair priced at its kept share of them."""
    model = redundant_mlp()
    result, report = onnxlr.optimize(model, calibration=batches(6), latency_budget=BUDGET, input_shapes=SHAPES, verify=False)
    by_name = check_plan(model, result, report)
    assert report["latency"]["timed_layers"] == 2
    assert report["latency"]["targets_ms"] > 0
    if by_name["up"]["method"] == "joint":
        assert report["latency"]["joint_estimated"] == 2


@pytest.mark.parametrize("objective", [[], ["--objective", "latency"]])
def test_the_cli_plans_a_latency_budget_with_the_default_methods(tmp_path, objective):
    model = opaque_pair()
    source, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    crafted_table(model, tmp_path / "t.json")
    np.savez(tmp_path / "calib.npz", x=np.concatenate([b["x"] for b in batches(6)]))
    result = onnxlr_cli("optimize", source, output, "--latency-budget", str(BUDGET), "--calibration",
                        tmp_path / "calib.npz", "--latency-table", tmp_path / "t.json", "--shape", "x:8x32",
                        "--no-gate", "--report", tmp_path / "r.json", *objective)
    assert result.returncode == 0, result.stderr
    written = onnx.load(output)
    report = json.loads((tmp_path / "r.json").read_text())
    by_name = check_plan(model, written, report)
    assert by_name["side"]["status"] == "factorized"
