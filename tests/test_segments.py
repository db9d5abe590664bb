"""Running a model in segments (one onnxruntime session of a run of nodes at a time) gives the whole model's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from model_files import save_external
from onnx import TensorProto, helper, numpy_helper

from onnxlr.verification import segments
from onnxlr.verification.runtime import make_session


def mlp_file(tmp_path, layers: int = 4, width: int = 32):
    """x (N, S, width) -> [MatMul W_i -> Relu] x layers, with a Shape/Reshape pair (a non-batched 1-D value
    crossing the cuts) and an If whose branches read a value of the outer graph; weights in external data."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    nodes.append(helper.make_node("Shape", ["x"], ["shape"]))
    current = "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / 6, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
        current = f"r{i}"
    nodes.append(helper.make_node("Reshape", [current, "shape"], ["flat"]))
    # A condition computed at run time (onnxruntime cannot fold an If on an external-data constant condition).
    nodes += [helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0), helper.make_node("IsNaN", ["peak"], ["nan"]),
              helper.make_node("Not", ["nan"], ["cond"])]
    then = helper.make_graph([helper.make_node("Add", ["flat", "r0"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Sub", ["flat", "r0"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, width]),
                               helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", 3, width])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    return save_external(model, path, location="m.data")


@pytest.mark.parametrize("budget", [1, 5000, 10**9])
def test_segments_give_the_whole_models_outputs(tmp_path, budget):
    path = mlp_file(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    planned = segments.plan(model.graph, budget, ["y", "r1"])
    assert sum(len(s.nodes) for s in planned) == len(model.graph.node)
    if budget == 1:  # every weight its own segment: no segment holds more than one 32x32 float matrix
        assert max(s.weight_bytes for s in planned) <= 32 * 32 * 4 + 1 and len(planned) >= 4
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((n, 3, 32)).astype(np.float32)} for n in (2, 5)]
    pieces = segments.run_in_segments(path, batches, ["y", "r1"], budget)
    whole = make_session(str(path), "cpu")
    for batch, piece in zip(batches, pieces):
        expected = whole.run(["y", "r1"], batch)
        np.testing.assert_allclose(piece["y"], expected[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(piece["r1"], expected[1], rtol=1e-6, atol=1e-6)


def test_verification_in_segments_matches_the_whole_model(tmp_path):
    """The same metrics, per output and per factorized layer, whether the models run whole or in pieces."""
    import onnxlr
    from onnxlr.verification import verify

    path = mlp_file(tmp_path)
    rewritten, _ = onnxlr.optimize(str(path), rank_ratio=0.25, verify=False)
    onnxlr.save(rewritten, tmp_path / "lr.onnx", external_data=True)
    feeds = {"x": np.random.default_rng(2).standard_normal((6, 3, 32)).astype(np.float32)}
    layers = verify.factorized_outputs(tmp_path / "lr.onnx")
    gates = verify.Gates.chosen(default_gate=False)
    whole = verify.verify(str(path), str(tmp_path / "lr.onnx"), feeds, ["cpu"], gates, batch_size=4)
    pieces = verify.verify(str(path), str(tmp_path / "lr.onnx"), feeds, ["cpu"], gates, batch_size=4,
                           per_layer=layers, segment_budget=5000)
    assert pieces.providers["cpu"]["segment_budget_bytes"] == 5000 and layers
    for name, metrics in whole.providers["cpu"]["outputs"].items():
        assert pieces.providers["cpu"]["outputs"][name]["cosine"] == pytest.approx(metrics["cosine"], abs=1e-6)
    assert set(pieces.providers["cpu"]["layers"]) == set(layers)  # --per-layer works with external data here


def wide_file(tmp_path, layers: int = 4):
    """x (N, 1024) -> MatMul/Relu x layers of 1024x2560 / 2560x1024 weights (about 10.5 MB each), external data."""
    rng = np.random.default_rng(0)
    nodes, inits, current, width = [], [], "x", 1024
    for i in range(layers):
        out = 2560 if i % 2 == 0 else 1024
        inits.append(numpy_helper.from_array((rng.standard_normal((width, out)) / 40).astype(np.float32), f"W{i}"))
        nodes += [helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        current, width = f"r{i}", out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", width])], inits)
    return save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "wide.onnx")


def test_optimize_verifies_in_segments_when_the_whole_model_does_not_fit(tmp_path, monkeypatch):
    from graphs import onnxlr_cli

    source = wide_file(tmp_path)
    # The whole model's session is estimated at about 246 MB (42 MB of weights x 1.1 + 200 MB); 240 MB is "free".
    monkeypatch.setenv("ONNXLR_MEMORY_LIMIT", "240MB")
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--no-gate", "--external-data",
                        "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert "verifying in segments of at most" in result.stderr
    import json

    verification = json.loads((tmp_path / "r.json").read_text())["verification"]
    entry = verification["providers"]["cpu"]
    assert 16 << 20 <= entry["segment_budget_bytes"] < 42 << 20 and entry["outputs"]


def shared_input_file(tmp_path):
    """mlp_file's chain plus two more MatMuls reading x (as q/k/v read one normalized input)."""
    path = mlp_file(tmp_path)
    model = onnx.load(str(path))
    rng = np.random.default_rng(3)
    for name in ("Wa", "Wb"):
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), name))
        model.graph.node.append(helper.make_node("MatMul", ["x", name], [f"out_{name}"]))
        model.graph.output.append(helper.make_tensor_value_info(f"out_{name}", TensorProto.FLOAT, ["N", 3, 32]))
    return save_external(model, tmp_path / "shared.onnx", location="shared.data")


def test_statistics_in_segments_match_the_whole_model(tmp_path):
    """Block by block (every weight its own segment) the Grams, sums and counts are the whole model's."""
    import onnx_ir as ir

    from onnxlr.calibrate import calibration

    path = shared_input_file(tmp_path)
    model = ir.load(str(path))
    found = calibration.probes(model)
    rng = np.random.default_rng(4)
    batches = [{"x": rng.standard_normal((n, 3, 32)).astype(np.float32)} for n in (2, 5)]
    whole = calibration.moments(calibration.Runner(str(path), model, found), batches)
    runner = calibration.Runner(str(path), model, found, segment_budget=1)
    pieces = calibration.moments(runner, batches)
    assert set(pieces) == set(whole) and len(whole) == 6
    for key, acc in whole.items():
        np.testing.assert_allclose(pieces[key].result(), acc.result(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(pieces[key].sums, acc.sums, rtol=1e-6, atol=1e-6)
        assert pieces[key].count == acc.count == 7 * 3
    # The three readers of x share one accumulator (one Gram in memory, not three).
    readers_of_x = [p.key for p in found if p.activation == "x"]
    assert len(readers_of_x) == 3 and len({id(pieces[key]) for key in readers_of_x}) == 1
    with pytest.raises(Exception, match="does not fit in memory"):
        runner.run(batches[0], ["x"])  # whole-model steps refuse


def test_optimize_calibrates_in_segments_when_the_whole_model_does_not_fit(tmp_path, monkeypatch):
    from graphs import onnxlr_cli

    from onnxlr.calibrate import calibration
    from onnxlr.model_io.shapes import infer_shapes
    from onnxlr.verification import memory

    source = wide_file(tmp_path)
    import onnx_ir as ir

    model = ir.load(str(source))
    # One float64 Gram per activation: K = 1024, 2560, 1024, 2560.
    shapes = infer_shapes(model, {"x": (16, 1024)})
    whitening = memory.WHITENING_COPIES * 2560**2 * 8
    assert calibration.statistics_bytes(model, shapes) == ((2 * 1024**2 + 2 * 2560**2) * 8, whitening)
    assert calibration.statistics_bytes(model, shapes, lambda probe: probe.activation == "x") == (
        1024**2 * 8, memory.WHITENING_COPIES * 1024**2 * 8)
    # Block by block, 2 batches of 16 vectors: every activation keeps its 32 vectors on disk (32 <= K / 2).
    assert calibration.statistics_bytes(model, shapes, batches=2) == (0, 2 * 32 * 2560 * 8)
    # 40 batches (640 vectors): the 1024-wide activations take Grams, the 2560-wide ones keep their vectors.
    assert calibration.statistics_bytes(model, shapes, batches=40) == (2 * 1024**2 * 8, memory.WHITENING_COPIES * 1024**2 * 8)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).standard_normal((24, 1024)).astype(np.float32))
    common = ["--calibration", str(tmp_path / "calib.npz"), "--rank-ratio", "0.25", "--no-gate", "--external-data",
              "--methods", "svd"]  # per matrix: joint pairs compare whole-model runs, which segments do not allow
    whole = onnxlr_cli("optimize", str(source), str(tmp_path / "whole.onnx"), *common)
    assert whole.returncode == 0, whole.stderr
    # Whole: 42 MB of weights x 1.1 + 122 MB of Grams + 5 x 52 MB whitening + 200 MB is over 620 MB; a segment of
    # 25 MB fits beside them.
    monkeypatch.setenv("ONNXLR_MEMORY_LIMIT", "620MB")
    pieces = onnxlr_cli("optimize", str(source), str(tmp_path / "pieces.onnx"), *common)
    assert pieces.returncode == 0, pieces.stderr
    assert "collecting the statistics block by block" in pieces.stderr
    # The same statistics give the same factors (up to rotations within near-equal singular values): same outputs.
    x = np.load(tmp_path / "calib.npz")["x"]
    from_whole, from_pieces = (make_session(str(tmp_path / f"{n}.onnx"), "cpu").run(None, {"x": x})[0]
                               for n in ("whole", "pieces"))
    np.testing.assert_allclose(from_pieces, from_whole, rtol=1e-4, atol=1e-4 * np.abs(from_whole).max())
    paired = onnxlr_cli("optimize", str(source), str(tmp_path / "p.onnx"), *common[:-2])
    assert paired.returncode == 0 and "coupled pairs are factorized per matrix" in paired.stderr
    # A step that runs the whole model cannot run in segments: exit 2 before any work, naming it.
    refused = onnxlr_cli("optimize", str(source), str(tmp_path / "t.onnx"), "--calibration", str(tmp_path / "calib.npz"),
                         "--target-cosine", "0.9")
    assert refused.returncode == 2 and "--target-cosine/--target-error run the whole model" in refused.stderr
    assert not (tmp_path / "t.onnx").exists()


def test_verify_runs_in_segments_when_the_whole_model_does_not_fit(tmp_path, monkeypatch):
    """`onnxlr verify` plans its memory as optimize does, and lists the per-layer check there."""
    import json

    from graphs import onnxlr_cli

    import onnxlr

    source = wide_file(tmp_path)
    model, _ = onnxlr.optimize(str(source), rank_ratio=0.25, verify=False)
    onnxlr.save(model, tmp_path / "lr.onnx", external_data=True)
    monkeypatch.setenv("ONNXLR_MEMORY_LIMIT", "240MB")
    result = onnxlr_cli("verify", str(source), str(tmp_path / "lr.onnx"), "--no-gate", "--json", str(tmp_path / "v.json"))
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / "v.json").read_text())["providers"]["cpu"]
    assert entry["segment_budget_bytes"] < 42 << 20 and len(entry["layer_checks"]) == 4
    assert "per-layer check on cpu" in result.stdout
    whole = onnxlr_cli("verify", str(source), str(tmp_path / "lr.onnx"), "--no-gate", "--no-memory-check",
                       "--json", str(tmp_path / "w.json"))
    assert whole.returncode == 0 and "segment_budget_bytes" not in json.loads((tmp_path / "w.json").read_text())[
        "providers"]["cpu"]


def test_calibration_in_segments_counts_only_the_statistics_that_take_grams(tmp_path, monkeypatch):
    """Under one memory limit, a few samples (kept on disk) calibrate block by block, while enough samples to make
    every activation a K x K Gram stop before any work, with the statistics named and nothing written."""
    from graphs import onnxlr_cli

    source = wide_file(tmp_path)
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "few.npz", x=rng.standard_normal((24, 1024)).astype(np.float32))
    np.savez(tmp_path / "many.npz", x=rng.standard_normal((1400, 1024)).astype(np.float32))
    monkeypatch.setenv("ONNXLR_MEMORY_LIMIT", "400MB")
    common = ["--rank-ratio", "0.25", "--no-verify", "--methods", "svd", "--report"]
    few = onnxlr_cli("optimize", str(source), str(tmp_path / "few.onnx"), "--calibration", str(tmp_path / "few.npz"),
                     *common, str(tmp_path / "few.json"))
    assert few.returncode == 0, few.stderr
    assert "collecting the statistics block by block" in few.stderr
    import json

    layers = json.loads((tmp_path / "few.json").read_text())["layers"]
    assert [layer["method"] for layer in layers] == ["whitened"] * 4
    # 1400 vectors: every activation takes a Gram (122 MB, and five copies of the largest to whiten): no fit.
    many = onnxlr_cli("optimize", str(source), str(tmp_path / "many.onnx"), "--calibration",
                      str(tmp_path / "many.npz"), *common, str(tmp_path / "many.json"))
    assert many.returncode == 2 and "calibration, even in segments, would need" in many.stderr
    assert "of calibration statistics" in many.stderr and not (tmp_path / "many.onnx").exists()
