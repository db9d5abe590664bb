"""--quantize auto (onnxlr.factorize.precision): the plan over precision x correction rank, what it writes (run by
onnxruntime against the float original on inputs calibration never saw) and how it refuses what it cannot do."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import init, make_model, tensor_input
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxlr
from onnxlr.calibrate import datafit
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import precision, quantize

VOCAB, D_IN, HIDDEN, D_OUT, SEQ = 256, 64, 128, 48, 8


def embedder() -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul -> Relu -> MatMul -> y: one table and two MatMuls, dense weights (4 bits lose
    visibly on them)."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((VOCAB, D_IN)) * np.geomspace(3.0, 0.1, D_IN)).astype(np.float32)
    w1 = (rng.standard_normal((D_IN, HIDDEN)) / np.sqrt(D_IN)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, D_OUT)) / np.sqrt(HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [tensor_input("ids", ["n", SEQ], onnx.TensorProto.INT64)],
                      [tensor_input("y", ["n", SEQ, D_OUT])], [init("E", table), init("W1", w1), init("W2", w2)])


def ids(count: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids with a skewed frequency, as text has."""
    rng = np.random.default_rng(seed)
    return {"ids": np.minimum(rng.zipf(1.3, (count, SEQ)) - 1, VOCAB - 1).astype(np.int64)}


CALIBRATION = [ids(64, 1), ids(64, 2)]
HELD_OUT = [ids(64, 7)]


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    a, b = reference.ravel().astype(np.float64), candidate.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes the initializers take as stored (4-bit tensors packed two to a byte)."""
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def auto(model: onnx.ModelProto, **settings) -> tuple[onnx.ModelProto, dict]:
    return onnxlr.optimize(model, quantize="auto", calibration=CALIBRATION, heldout=HELD_OUT, verify=False,
                           **settings)


# ----------------------------------------------------------------------------- the plan's arithmetic


options = st.lists(st.tuples(st.integers(1, 10_000), st.floats(0.0, 1.0)), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(options)
def test_the_hull_keeps_fewer_bytes_with_more_error_and_falling_savings_per_byte(points):
    hull = precision.lower_hull([precision.Option(4, nbytes, loss) for nbytes, loss in points])
    assert hull[0].bytes == min(nbytes for nbytes, _ in points)
    assert all(a.bytes < b.bytes and a.loss > b.loss for a, b in zip(hull, hull[1:]))
    slopes = [precision._slope(a, b) for a, b in zip(hull, hull[1:])]
    assert all(x > y for x, y in zip(slopes, slopes[1:]))
    best = min(loss for _, loss in points)  # the least error any option has is reached
    assert hull[-1].loss == best


@settings(max_examples=100, deadline=None)
@given(st.lists(options, min_size=1, max_size=5))
def test_the_upgrade_path_adds_bytes_and_removes_error_one_layer_at_a_time(layers_points):
    layers = [precision.Layer(f"l{i}", f"n{i}", False,
                              precision.lower_hull([precision.Option(4, b, loss) for b, loss in points]))
              for i, points in enumerate(layers_points)]
    steps = precision.upgrade_path(layers)
    assert steps[0].choice == (0,) * len(layers)
    assert steps[-1].choice == tuple(len(layer.options) - 1 for layer in layers)
    assert len(steps) == 1 + sum(len(layer.options) - 1 for layer in layers)
    for before, after in zip(steps, steps[1:]):
        assert sum(a != b for a, b in zip(before.choice, after.choice)) == 1
        assert after.bytes > before.bytes and after.loss <= before.loss + 1e-12
        assert after.bytes == sum(layer.options[at].bytes for layer, at in zip(layers, after.choice))


# ----------------------------------------------------------------------------- what it writes


def test_the_priced_losses_are_what_the_written_layer_does_to_the_outputs(tmp_path):
    """A plain option's loss is measured; a corrected one's predicted from the whitened error its stored factors
    leave. Written alone (every other layer float), each moves the outputs by about what the plan said."""
    model = ir.serde.deserialize_model(embedder())
    data = datafit.CalibrationData(source=embedder().SerializeToString(), batches=CALIBRATION)
    with precision.named_copy(model) as source:
        layers = precision.plan_layers(model, source, data, block=32)
        assert sorted(layer.key for layer in layers) == ["e", "h", "y"]
        batches = datafit.first_samples(CALIBRATION, datafit.SENSITIVITY_SAMPLES)
        reference = quantize.outputs(data.source, batches)
        floats = tuple(len(layer.options) - 1 for layer in layers)
        assert all(layer.options[-1].bits == precision.FLOAT for layer in layers)
        checked = 0
        for index, layer in enumerate(layers):
            for at, option in enumerate(layer.options[:-1]):
                choice = floats[:index] + (at,) + floats[index + 1:]
                written = precision.write(source, layers, choice)
                measured = datafit.relative_error(reference, quantize.outputs(written, batches))
                if option.rank:
                    assert measured == pytest.approx(option.loss, rel=0.5, abs=1e-5), option  # tiny: the kernels round
                else:  # measured the same way when pricing: only the kernels' rounding differs
                    assert measured == pytest.approx(option.loss, rel=0.05), option
                checked += 1
        assert checked >= 4
        every_float = precision.write(source, layers, floats)
        assert np.array_equal(quantize.outputs(every_float, HELD_OUT)["y"], outputs(embedder(), HELD_OUT[0]))


@pytest.mark.parametrize(("goal", "share"), [(0.999, 0.8), (0.99, 0.5)])
def test_a_target_is_met_on_held_out_inputs_with_fewer_bytes(goal, share):
    model = embedder()
    planned, report = auto(model, target_cosine=goal)
    stage = report["quantization"]
    unseen = ids(128, 11)
    assert cosine(outputs(model, unseen), outputs(planned, unseen)) >= goal - 0.002
    assert stage["final"]["met"] and stage["final"]["cosine"] >= goal
    assert weight_bytes(planned) == stage["bytes_after"] < share * weight_bytes(model)
    assert sum(stage["plan"].values()) == stage["layers"] == 3
    assert {node.op_type for node in planned.graph.node} & {"MatMulNBits", "GatherBlockQuantized"}
    assert report["totals"]["factorized"] == 0
    assert {layer["reason_code"] for layer in report["layers"]} == {"precision_planned"}


def test_a_stricter_target_buys_more_bytes_and_a_looser_budget_less_error():
    model, unseen = embedder(), ids(128, 11)
    loose, _ = auto(model, target_cosine=0.98)
    strict, _ = auto(model, target_cosine=0.9995)
    assert weight_bytes(loose) < weight_bytes(strict)
    errors, sizes = [], []
    for budget in (0.16, 0.3):
        planned, report = auto(model, size_budget=budget)
        assert report["quantization"]["bytes_after"] <= budget * weight_bytes(model)
        sizes.append(weight_bytes(planned))
        errors.append(1 - cosine(outputs(model, unseen), outputs(planned, unseen)))
    assert sizes[0] < sizes[1] and errors[0] > errors[1]


def test_auto_refuses_what_it_cannot_plan():
    model = embedder()
    with pytest.raises(OnnxlrError, match="needs a goal"):
        auto(model)
    with pytest.raises(OnnxlrError, match="needs a goal"):
        auto(model, rank_ratio=0.5)
    with pytest.raises(OnnxlrError, match="needs calibration data"):
        onnxlr.optimize(model, quantize="auto", size_budget=0.3, verify=False)
    with pytest.raises(OnnxlrError, match="held-out"):
        onnxlr.optimize(model, quantize="auto", target_cosine=0.99, calibration=CALIBRATION, verify=False)
    with pytest.raises(OnnxlrError, match="correction_rank"):
        auto(model, target_cosine=0.99, correction_rank=8)
    with pytest.raises(OnnxlrError, match="size_budget is the byte budget of quantize auto"):
        onnxlr.optimize(model, quantize="int4", size_budget=0.3, verify=False)
    with pytest.raises(OnnxlrError, match="no plan fits"):
        auto(model, size_budget=0.01)
    conv = make_model([helper.make_node("Conv", ["x", "K"], ["y"], name="conv")],
                      [tensor_input("x", ["n", 4, 8, 8])], [tensor_input("y", ["n", 8, 6, 6])],
                      [init("K", np.ones((8, 4, 3, 3), np.float32))])
    with pytest.raises(OnnxlrError, match="has none"):
        onnxlr.optimize(conv, quantize="auto", size_budget=0.5, verify=False,
                        calibration=[{"x": np.ones((2, 4, 8, 8), np.float32)}])


def test_the_cli_plans_and_says_what_it_chose(tmp_path):
    from graphs import onnxlr_cli

    source, target = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(embedder(), source)
    np.savez(tmp_path / "calib.npz", **{"ids": np.concatenate([b["ids"] for b in CALIBRATION])})
    np.savez(tmp_path / "heldout.npz", **HELD_OUT[0])
    result = onnxlr_cli("optimize", str(source), str(target), "--calibration", str(tmp_path / "calib.npz"),
                        "--inputs", str(tmp_path / "heldout.npz"), "--quantize", "auto", "--target-cosine", "0.99")
    assert result.returncode == 0, result.stderr
    assert "planned (" in result.stdout and "held-out cosine" in result.stdout
    assert target.exists()
    missing = onnxlr_cli("optimize", str(source), str(tmp_path / "none.onnx"), "--quantize", "auto")
    assert missing.returncode == 2 and "needs a goal" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "none.onnx").exists()
