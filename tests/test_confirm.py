"""--objective latency confirmed end to end (issue 30): layers that do not pay in the whole model are put back.

Reverting is tested for exactness on every layer form the rewrite writes (IR 3 input weights, Transpose-folded
weights, Constant-node weights in a subgraph, Gemm with bias, Conv, a joint pair); the back-off is tested with the
timings set by the test (the machine is noisy), and the real confirmation for what it must do whatever the times:
what it writes is either measured faster end to end or the original's plan of zero layers.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import assert_outputs_close, onnxlr_cli, run
from test_coupled import batches, redundant_mlp
from test_latency import BATCH, matmuls
from test_old_ir import FEEDS, input_weights_model

import onnxlr
from onnxlr.factorize import revert
from onnxlr.model_io.io import load
from onnxlr.timing import confirm, latency


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXLR_CACHE_DIR", str(tmp_path / "cache"))


def as_ir(proto: onnx.ModelProto) -> ir.Model:
    return load(proto).model


def rewritten(model: onnx.ModelProto, **settings) -> tuple[ir.Model, dict]:
    result, report = onnxlr.optimize(as_ir(model), **settings, verify=False)
    return result, report


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


@pytest.mark.parametrize("ir_version", [3, 8])
def test_reverting_every_layer_gives_the_original_back(ir_version):
    model = input_weights_model(ir_version)
    options = {"inputs_as_constants": True} if ir_version >= 4 else {}
    result, report = rewritten(model, rank_ratio=0.5, allow_no_gain=True, **options)
    assert revert.rewritten_layers(result) == {"mm", "gemm", "mm_t", "conv"}
    done = revert.revert_layers(result, as_ir(model), ["mm", "gemm", "mm_t", "conv"])
    assert sorted(done) == ["conv", "gemm", "mm", "mm_t"]
    back = ir.to_proto(result)
    onnx.checker.check_model(back, full_check=True)
    assert revert.rewritten_layers(result) == set()
    assert "onnxlr.ranks" not in {p.key for p in back.metadata_props}
    for ref, out in zip(run(model, FEEDS), run(back, FEEDS)):
        np.testing.assert_array_equal(out, ref)  # the original's own nodes and weights: bit for bit
    # Nothing of the factors is left; the Transpose-folded weight comes back as its folded constant.
    assert not any("_lr_" in name for name in initializer_names(back))
    assert [value.name for value in back.graph.input][:2] == ["x", "img"]
    if ir_version < 4:  # IR 3: every initializer is listed as a graph input
        assert initializer_names(back) <= {value.name for value in back.graph.input}


def test_reverting_some_layers_equals_excluding_them():
    model = input_weights_model(8)
    result, _ = rewritten(model, rank_ratio=0.5, inputs_as_constants=True)
    revert.revert_layers(result, as_ir(model), ["gemm", "conv"])
    excluded, report = rewritten(model, rank_ratio=0.5, inputs_as_constants=True, exclude=("gemm", "conv"))
    assert revert.rewritten_layers(result) == {"mm", "mm_t"} == revert.rewritten_layers(excluded)
    ranks = json.loads(result.metadata_props["onnxlr.ranks"])
    assert set(ranks) == {"mm", "mm_t"}
    for ref, out in zip(run(ir.to_proto(excluded), FEEDS), run(ir.to_proto(result), FEEDS)):
        np.testing.assert_array_equal(out, ref)


def test_reverting_a_layer_in_a_subgraph_with_a_constant_node_weight():
    from graphs import make_model, tensor_input
    from onnx import TensorProto, helper, numpy_helper
    from test_old_ir import weight

    branch = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(weight(8, 6))),
              helper.make_node("MatMul", ["x", "Wc"], ["t"], name="inner")]
    then_branch = helper.make_graph(branch, "then", [], [tensor_input("t", [2, 6])])
    else_branch = helper.make_graph([helper.make_node("MatMul", ["x", "V"], ["e"], name="outer_read")], "else", [],
                                    [tensor_input("e", [2, 6])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="if")]
    model = make_model(nodes, [tensor_input("c", [], TensorProto.BOOL), tensor_input("x", [2, 8])],
                       [tensor_input("y", [2, 6])], [onnx.numpy_helper.from_array(weight(8, 6), "V")])
    result, report = rewritten(model, rank_ratio=0.5, allow_no_gain=True)
    assert report["totals"]["factorized"] == 2
    revert.revert_layers(result, as_ir(model), ["inner", "outer_read"])
    back = ir.to_proto(result)
    onnx.checker.check_model(back, full_check=True)
    for flag in (True, False):
        feeds = {"c": np.array(flag), "x": weight(2, 8)}
        for ref, out in zip(run(model, feeds), run(back, feeds)):
            np.testing.assert_array_equal(out, ref)


def test_a_joint_pair_is_put_back_whole():
    model = redundant_mlp()
    result, report = rewritten(model, calibration=batches(6), param_ratio=0.5, methods=("svd", "joint"))
    assert {row["method"] for row in report["layers"]} == {"joint"}
    assert revert.rewritten_layers(result) == {"up", "down"}
    done = revert.revert_layers(result, as_ir(model), ["up"])  # the partner goes with it
    assert set(done) >= {"up", "down"}
    back = ir.to_proto(result)
    onnx.checker.check_model(back, full_check=True)
    assert initializer_names(back) == initializer_names(model)
    assert "onnxlr.joint" not in {p.key for p in back.metadata_props}
    feeds = batches(1)[0]
    for ref, out in zip(run(model, feeds), run(back, feeds)):
        np.testing.assert_array_equal(out, ref)


# ----------------------------------------------------------------------------- the back-off, with set timings


def fake_speeds(monkeypatch, speedups, in_context=None):
    """confirm.time_whole answers these speedups in turn; bench.profile_layers these layers (default: none)."""
    answers = iter(speedups)
    calls = []

    def time_whole(reference, candidate, feeds, provider="cpu", threads=1, seconds=1.0, external_data_folder=None):
        calls.append(revert.rewritten_layers(ir.from_proto(onnx.load_from_string(candidate))))
        value = next(answers)
        return confirm.Speed(speedup=value, p10=value * 0.95, p90=value * 1.05, original_ms=1.0,
                             rewritten_ms=1.0 / value, runs=10, provider=provider, threads=threads)

    def profile_layers(reference, candidate, feeds, provider="cpu", threads=1, runs=20, external_data_folder=None,
                       deployed=True):
        return {"layers": in_context or []}

    monkeypatch.setattr(confirm, "time_whole", time_whole)
    monkeypatch.setattr(confirm.bench, "profile_layers", profile_layers)
    return calls


def cached_times(model: ir.Model, tmp_path, pair_time) -> None:
    """This machine's latency cache holding set times (originals 1 ms, pairs pair_time(rank)): the plan is the
    test's, and the end-to-end confirmation still runs (a --latency-table plans for another device: it does not)."""
    from test_latency import BATCH, crafted_table

    table = crafted_table(model, tmp_path / "t.json", pair_time, BATCH)
    clock = latency.Clock({}, "cpu", 1)
    clock.entries = table["entries"]
    clock.save()


def test_a_plan_slower_end_to_end_is_backed_off_to_zero_layers(monkeypatch, tmp_path):
    model = matmuls(3)
    cached_times(model, tmp_path, lambda rank: 0.5)
    calls = fake_speeds(monkeypatch, [0.6, 0.7, 0.9, 0.95])
    result, report = onnxlr.optimize(model, rank_ratio=0.25, objective="latency", input_shapes=BATCH, verify=False)
    end = report["latency"]["end_to_end"]
    planned = {"layer0", "layer1", "layer2"}
    assert report["totals"]["factorized"] == 0 and revert.rewritten_layers(result) == set()
    assert calls == [planned, {"layer1", "layer2"}, {"layer2"}, set()]  # half of what is left each time
    assert end["before_reverts"]["speedup"] == 0.6 and set(end["reverted"]) == planned
    assert end["speed"]["speedup"] == 0.95  # the original's plan of zero layers: what is written
    for row in report["layers"]:
        assert row["reason_code"] == "not_faster_in_model" and "backed off" in row["reason"]
        assert row["params_after"] == row["params_before"] and row["rank"] is None
    assert report["totals"]["params_after"] == report["totals"]["params_before"]
    assert report["totals"]["bytes_after"] == report["totals"]["bytes_before"]
    assert report["cost"]["after"]["flops"] == report["cost"]["before"]["flops"]


def test_the_back_off_stops_once_the_model_is_faster(monkeypatch, tmp_path):
    model = matmuls(3)
    cached_times(model, tmp_path, lambda rank: 0.5)
    calls = fake_speeds(monkeypatch, [0.9, 1.2])
    result, report = onnxlr.optimize(model, rank_ratio=0.25, objective="latency", input_shapes=BATCH, verify=False)
    assert calls == [{"layer0", "layer1", "layer2"}, {"layer1", "layer2"}]
    assert report["totals"]["factorized"] == 2 and revert.rewritten_layers(result) == {"layer1", "layer2"}
    assert report["latency"]["end_to_end"]["speed"]["speedup"] == 1.2


def test_a_layer_slower_in_context_is_put_back_though_the_model_is_faster(monkeypatch, tmp_path):
    from test_latency import crafted_table

    model = matmuls(3)
    crafted_table(model, tmp_path / "t.json", lambda rank: 0.5)
    # A latency table plans for another device: nothing is confirmed here.
    _, report = onnxlr.optimize(model, rank_ratio=0.25, latency_table=str(tmp_path / "t.json"),
                                input_shapes={f"x{i}": (32, 64) for i in range(3)}, verify=False)
    assert report["totals"]["factorized"] == 3 and "end_to_end" not in report["latency"]
    in_context = [{"name": "layer1", "kind": "pair", "original_us": 10.0, "pair_us": 30.0, "speedup": 1 / 3},
                  {"name": "layer0", "kind": "pair", "original_us": 10.0, "pair_us": 5.0, "speedup": 2.0}]
    fake_speeds(monkeypatch, [1.3], in_context)
    original = as_ir(ir.to_proto(model))
    candidate = as_ir(ir.to_proto(onnxlr.optimize(model, rank_ratio=0.25, verify=False)[0]))
    outcome = confirm.confirm_latency(original, confirm.session_source(original), candidate,
                                      {f"x{i}": np.zeros((32, 64), np.float32) for i in range(3)})
    assert set(outcome.reverted) == {"layer1"} and "slower in the whole model" in outcome.reverted["layer1"]
    assert revert.rewritten_layers(candidate) == {"layer0", "layer2"}
    assert outcome.speed.speedup == 1.3 and outcome.first_speed is None


# ----------------------------------------------------------------------------- the real confirmation


def test_what_latency_writes_is_measured_faster_or_left_as_it_was():
    big = {f"x{i}": (4096, 64) for i in range(3)}
    model = matmuls(3)
    result, report = onnxlr.optimize(model, rank_ratio=0.25, objective="latency", input_shapes=big, verify=False)
    end = report["latency"]["end_to_end"]
    speed = end["speed"]
    assert speed["runs"] >= confirm.MIN_RUNS and speed["original_ms"] > 0 and speed["optimization_level"] == "all"
    factorized = {row["name"] for row in report["layers"] if row["status"] == "factorized"}
    assert factorized == revert.rewritten_layers(result)
    assert speed["speedup"] > 1.0 or not factorized  # never a slower model
    for name, why in end["reverted"].items():
        row = next(row for row in report["layers"] if row["name"] == name)
        assert row["reason_code"] == "not_faster_in_model" and row["reason"] == why


def test_the_cli_reports_the_end_to_end_speed(tmp_path):
    model = matmuls(2)
    source = tmp_path / "m.onnx"
    ir.save(model, source)
    result = onnxlr_cli("optimize", source, tmp_path / "out.onnx", "--objective", "latency", "--rank-ratio", "0.25",
                        "--shape", "x0:2048x64", "--shape", "x1:2048x64", "--no-gate", "--report",
                        tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    speed = report["latency"]["end_to_end"]["speed"]
    assert f"{speed['speedup']:.2f}x" in result.stdout and "end to end" in result.stdout
    assert "whole model, ms end to end" in (tmp_path / "r.md").read_text()
    written = onnx.load(tmp_path / "out.onnx")
    feeds = {f"x{i}": np.ones((3, 64), np.float32) for i in range(2)}
    assert_outputs_close(run(onnx.load(source), feeds), run(written, feeds), rtol=1.0, atol=1.0)


def test_the_profile_ranks_the_kernels_whose_time_grew_most_rewritten_or_not():
    from onnxlr.timing import bench

    reference = {"a": 10.0, "conv": 5.0, "relu": 2.0, "gone": 3.0}
    candidate = {"a": 12.0, "conv_lr1": 4.0, "conv_lr_mid_nchwc": 6.0, "relu": 9.0, "new": 1.0}
    grown = bench.grown_nodes(reference, candidate, {"conv"})
    assert [(row["name"], row["growth_us"], row["touched"]) for row in grown] == [
        ("relu", 7.0, False), ("conv", 5.0, True), ("a", 2.0, False), ("new", 1.0, False)]  # "gone" shrank


def test_bench_profile_shows_the_grown_kernels_at_the_deployed_level(tmp_path):
    source = tmp_path / "m.onnx"
    ir.save(matmuls(2), source)
    rewritten_model, _ = onnxlr.optimize(str(source), rank_ratio=0.25, verify=False)
    ir.save(rewritten_model, tmp_path / "lr.onnx")
    result = onnxlr_cli("bench", tmp_path / "lr.onnx", "--compare", source, "--profile", "--runs", "2",
                        "--shape", "x0:32x64", "--shape", "x1:32x64", "--json", tmp_path / "p.json")
    assert result.returncode == 0, result.stderr
    profile = json.loads((tmp_path / "p.json").read_text())["providers"]["cpu"]["profile"]
    assert profile["grown_optimization_level"] == "all"
    assert all(row["growth_us"] > 0 for row in profile["grown"])
    if profile["grown"]:
        assert "grew the most" in result.stdout


def test_the_size_objective_states_the_end_to_end_speed_and_warns_when_slower(tmp_path):
    from onnxlr.render.report import speed_lines

    source = tmp_path / "m.onnx"
    ir.save(matmuls(2), source)
    result = onnxlr_cli("optimize", source, tmp_path / "out.onnx", "--rank-ratio", "0.25", "--no-gate",
                        "--shape", "x0:64x64", "--shape", "x1:64x64", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    speed = json.loads((tmp_path / "r.json").read_text())["speed"]
    assert speed["runs"] >= confirm.MIN_RUNS and speed["original_ms"] > 0 and speed["rewritten_ms"] > 0
    assert f"{speed['speedup']:.2f}x" in result.stdout
    off = onnxlr_cli("optimize", source, tmp_path / "out2.onnx", "--rank-ratio", "0.25", "--no-gate",
                     "--no-speed-check", "--report", tmp_path / "r2.json")
    assert off.returncode == 0 and "speed" not in json.loads((tmp_path / "r2.json").read_text())
    slower = {"speed": {**speed, "speedup": 0.8, "p10": 0.7, "p90": 0.9}}
    assert any("measurably slower" in line for line in speed_lines(slower))
    assert not any("measurably slower" in line for line in speed_lines({"speed": {**speed, "p90": 1.1}}))


def test_the_api_times_the_size_objective_when_asked():
    model = matmuls(2)
    _, report = onnxlr.optimize(model, rank_ratio=0.25, input_shapes={"x0": (64, 64), "x1": (64, 64)},
                                speed_check=True, verify=False)
    assert report["speed"]["runs"] >= confirm.MIN_RUNS and report["speed"]["rewritten_ms"] > 0
    assert "speed" not in onnxlr.optimize(model, rank_ratio=0.25, verify=False)[1]  # off by default in the API


def test_the_confirmation_times_at_the_shapes_the_plan_was_timed_at():
    model = as_ir(ir.to_proto(matmuls(1)))
    batch = {"x0": np.ones((8, 64), np.float32)}
    assert confirm.feeds_for(model, confirm.session_source(model), [batch], None)["x0"].shape == (8, 64)
    assert confirm.feeds_for(model, confirm.session_source(model), [batch], {"x0": (8, 64)})["x0"] is batch["x0"]
    shaped = confirm.feeds_for(model, confirm.session_source(model), [batch], {"x0": (3, 64)})
    assert shaped["x0"].shape == (3, 64)  # --shape wins over the calibration batch, as in the plan


@pytest.mark.parametrize("folded", [False, True])
def test_reverting_one_reader_of_a_shared_weight_keeps_the_others(folded):
    """Shared weights: an ALBERT-style weight read through Identity nodes, and a tied embedding whose head reads the
    table's transpose (the factors reused, one through a Transpose node): one reader put back, the rest stay."""
    from test_shared_weights import albert_like, ids_feed, tied_head, x_feed

    for model, feeds, reader, names in ((albert_like(), x_feed(), "layer1", {"layer0", "layer1", "layer2"}),
                                        (tied_head(folded), ids_feed(), "head", {"embed", "head"})):
        result, report = rewritten(model, rank_ratio=1.0, allow_no_gain=True, ops=("MatMul", "Gather"))
        assert names <= revert.rewritten_layers(result)
        revert.revert_layers(result, as_ir(model), [reader])
        assert revert.rewritten_layers(result) == revert.rewritten_layers(as_ir(ir.to_proto(result))) != set()
        assert reader not in revert.rewritten_layers(result)
        back = ir.to_proto(result)
        onnx.checker.check_model(back, full_check=True)
        assert_outputs_close(run(model, feeds), run(back, feeds), rtol=1e-4, atol=1e-4)  # full rank: exact
        revert.revert_layers(result, as_ir(model), revert.rewritten_layers(result))
        back = ir.to_proto(result)
        assert initializer_names(back) == initializer_names(model)
        for ref, out in zip(run(model, feeds), run(back, feeds)):
            np.testing.assert_array_equal(out, ref)


def test_readers_of_one_shared_weight_are_put_back_together(monkeypatch):
    """Putting back one reader of a shared weight alone would store the weight beside its factors (a larger file):
    the readers are one unit."""
    from test_shared_weights import albert_like, x_feed

    model = albert_like()
    result, _ = rewritten(model, rank_ratio=0.25)
    units = revert.units(result)
    assert set(units) == {"layer0", "layer1", "layer2"} and len(set(units.values())) == 1
    fake_speeds(monkeypatch, [1.2], [{"name": "layer1", "kind": "pair", "original_us": 10.0, "pair_us": 30.0,
                                      "speedup": 1 / 3}])
    feeds = x_feed()
    outcome = confirm.confirm_latency(as_ir(model), confirm.session_source(as_ir(model)), result, feeds)
    assert set(outcome.reverted) == {"layer0", "layer1", "layer2"}
    back = ir.to_proto(result)
    assert initializer_names(back) == initializer_names(model)
    for ref, out in zip(run(model, feeds), run(back, feeds)):
        np.testing.assert_array_equal(out, ref)
