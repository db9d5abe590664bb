"""Synthesized inputs the model accepts: shared and unnamed dynamic dims, -1 dims, scalars, the ladder of
candidate sizes tried on the reference, and who is blamed when a model fails on them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, onnxlr_cli, run, tensor_input
from onnx import TensorProto, helper

from onnxlr.errors import OnnxlrError
from onnxlr.model_io import inputs, synthesis

RNG = np.random.default_rng(7)


def specs_of(model: onnx.ModelProto) -> dict[str, inputs.InputSpec]:
    return inputs.input_specs(ir.serde.deserialize_model(model))


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, path)
    return str(path)


def verify_json(tmp_path, reference, candidate, *args):
    """`onnxlr verify REFERENCE CANDIDATE ARGS --json`: the process and the JSON (None when not written)."""
    out = tmp_path / "verify.json"
    result = onnxlr_cli("verify", reference, candidate, "--json", out, *args)
    return result, (json.loads(out.read_text()) if out.exists() else None)


# ----------------------------------------------------------------------------- models


def two_inputs_sharing_dims(a_shape=("batch", "seq"), b_shape=("batch", "seq")) -> onnx.ModelProto:
    return make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                      [tensor_input("a", list(a_shape)), tensor_input("b", list(b_shape))], [tensor_input("y", None)])


def matmul_with_shape(shape) -> onnx.ModelProto:
    """x (shape, last dim 16) @ W (16 x 8); written without the checker (it may reject -1 dims)."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [tensor_input("x", shape)], [tensor_input("y", None)],
                              [init("W", RNG.standard_normal((16, 8)).astype(np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def stride_net(levels: int = 5) -> onnx.ModelProto:
    """x (batch, 3, H, W) -> `levels` stride-2 convs -> the last map upsampled x2 and concatenated with the one
    before: runs only when H and W are multiples of 2**levels (16x16 fails a stride-32 net)."""
    nodes, inits, previous, channels = [], [], "x", 3
    for level in range(1, levels + 1):
        inits.append(init(f"K{level}", RNG.standard_normal((4, channels, 3, 3)).astype(np.float32) * 0.3))
        nodes.append(helper.make_node("Conv", [previous, f"K{level}"], [f"c{level}"], name=f"conv{level}",
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        previous, channels = f"c{level}", 4
    inits.append(init("scales", np.array([1, 1, 2, 2], np.float32)))
    nodes += [helper.make_node("Resize", [previous, "", "scales"], ["up"], mode="nearest"),
              helper.make_node("Concat", [f"c{levels - 1}", "up"], ["y"], axis=1)]
    return make_model(nodes, [tensor_input("x", ["batch", 3, "height", "width"])], [tensor_input("y", None)], inits)


def audio_front_end() -> onnx.ModelProto:
    """Silero-like: wav (batch, samples) reflect-padded by 32 on time (needs > 32 samples), a strided Conv1d;
    a state (2, batch, 64) with fixed and dynamic dims; a scalar int64 sample rate that scales the output."""
    nodes = [helper.make_node("Unsqueeze", ["wav", "axis1"], ["w3"]),
             helper.make_node("Pad", ["w3", "pads"], ["padded"], mode="reflect"),
             helper.make_node("Conv", ["padded", "K"], ["frames"], name="stft", strides=[32]),
             helper.make_node("ReduceMean", ["frames"], ["pooled"], axes=[2], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["features"], name="proj"),
             helper.make_node("ReduceMean", ["state"], ["memory"], axes=[0], keepdims=0),
             helper.make_node("Add", ["features", "memory"], ["mixed"]),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "rate"], ["scale"]),
             helper.make_node("Mul", ["mixed", "scale"], ["out"]),
             helper.make_node("Add", ["state", "out"], ["new_state"])]
    inits = [init("axis1", np.array([1], np.int64)), init("pads", np.array([0, 0, 32, 0, 0, 32], np.int64)),
             init("K", RNG.standard_normal((8, 1, 64)).astype(np.float32) * 0.1),
             init("W", RNG.standard_normal((8, 64)).astype(np.float32)), init("rate", np.array(16000, np.float32))]
    return make_model(nodes, [tensor_input("wav", ["batch", "num_samples"]), tensor_input("state", [2, "batch", 64]),
                              tensor_input("sr", [], TensorProto.INT64)],
                      [tensor_input("out", None), tensor_input("new_state", None)], inits)


def reshaped_to(width: int) -> onnx.ModelProto:
    """x (batch, length) reshaped to (batch, 7, width / 7): only length == width runs (77: no ladder holds it)."""
    nodes = [helper.make_node("Reshape", ["x", "to"], ["y"])]
    return make_model(nodes, [tensor_input("x", ["batch", "length"])], [tensor_input("y", None)],
                      [init("to", np.array([0, 7, width // 7], np.int64))])


# ----------------------------------------------------------------------------- shapes from the signature


def test_dims_shared_by_name_stay_equal_across_inputs():
    specs = specs_of(two_inputs_sharing_dims())
    feeds = inputs.synthesize_inputs(specs, samples=3)
    assert feeds["a"].shape == feeds["b"].shape == (3, 16)
    # A --shape on one input sizes the same-named dims of the others.
    feeds = inputs.synthesize_inputs(specs, samples=3, shapes={"a": (2, 40)})
    assert feeds["b"].shape == (2, 40)


def test_a_named_batch_dim_in_a_state_takes_the_sample_count():
    specs = specs_of(audio_front_end())
    shapes = inputs.resolve_shapes(specs, samples=5)
    assert shapes["wav"] == (5, 16) and shapes["state"] == (2, 5, 64) and shapes["sr"] == ()


def test_unnamed_and_negative_dims_are_dynamic():
    for shape in ([None, None, 16], [-1, -1, 16], ["batch", -1, 16]):
        specs = specs_of(matmul_with_shape(shape))
        assert specs["x"].shape[1] is None
        assert inputs.synthesize_inputs(specs, samples=3)["x"].shape == (3, 16, 16)


def test_a_weight_fixes_the_dim_it_contracts():
    specs = specs_of(matmul_with_shape(["batch", "seq", "hidden"]))
    assert specs["x"].implied == {2: 16}
    assert inputs.synthesize_inputs(specs, samples=2)["x"].shape == (2, 16, 16)
    net = specs_of(make_model([helper.make_node("Conv", ["x", "K"], ["y"])], [tensor_input("x", ["n", "c", 8, 8])],
                              [tensor_input("y", None)], [init("K", np.zeros((4, 5, 3, 3), np.float32))]))
    assert inputs.resolve_shapes(net, samples=1)["x"] == (1, 5, 8, 8)


def test_scalars_integers_and_booleans_synthesize_sensibly():
    signature = {"sr": ([], TensorProto.INT64), "count": ([], TensorProto.INT32), "gain": ([], TensorProto.FLOAT),
                 "ids": (["batch", "seq"], TensorProto.INT64), "keep": (["batch", "seq"], TensorProto.BOOL)}
    model = make_model([helper.make_node("Identity", [name], [f"{name}_out"]) for name in signature],
                       [tensor_input(name, shape, kind) for name, (shape, kind) in signature.items()],
                       [tensor_input(f"{name}_out", None, kind) for name, (_, kind) in signature.items()])
    feeds = inputs.synthesize_inputs(specs_of(model), samples=4)
    assert feeds["sr"].shape == () and feeds["sr"] == 16000 and feeds["sr"].dtype == np.int64
    assert feeds["count"] == 1 and feeds["gain"] == 1.0
    assert feeds["ids"].shape == (4, 16) and feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 0
    assert feeds["keep"].dtype == bool and feeds["keep"].shape == (4, 16)


# ----------------------------------------------------------------------------- the ladder, on the reference


def test_stride_32_net_fails_at_16_and_runs_at_the_first_spatial_size(tmp_path):
    model = stride_net(levels=5)
    with pytest.raises(Exception, match="Concat"):
        run(model, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    path = save(model, tmp_path / "net.onnx")
    feeds = synthesis.feeds_the_model_accepts(path, specs_of(model), samples=2)
    assert feeds["x"].shape == (2, 3, 32, 32)


def test_the_ladder_climbs_until_the_reference_runs(tmp_path):
    model = stride_net(levels=6)  # 32x32 fails a stride-64 net; 64x64 runs
    path = save(model, tmp_path / "net.onnx")
    result, data = verify_json(tmp_path, path, path, "--samples", "2")
    assert result.returncode == 0, result.stderr
    assert data["inputs"] == {"x": [2, 3, 64, 64]} and data["synthesized"] is True
    assert "inputs (synthesized): x 2x3x64x64" in result.stdout


def test_audio_front_end_with_state_and_sample_rate_verifies(tmp_path):
    path = save(audio_front_end(), tmp_path / "vad.onnx")
    result, data = verify_json(tmp_path, path, path)
    assert result.returncode == 0, result.stderr
    # 16 samples cannot be reflect-padded by 32: the next sequence size runs.
    assert data["inputs"] == {"wav": [8, 128], "state": [2, 8, 64], "sr": []}
    assert "inputs (synthesized): wav 8x128, state 2x8x64, sr scalar" in result.stdout


def test_given_inputs_are_reported_as_given(tmp_path):
    path = save(two_inputs_sharing_dims(), tmp_path / "add.onnx")
    np.savez(tmp_path / "in.npz", a=np.ones((3, 5), np.float32), b=np.ones((3, 5), np.float32))
    result, data = verify_json(tmp_path, path, path, "--inputs", tmp_path / "in.npz")
    assert result.returncode == 0, result.stderr
    assert data["inputs"] == {"a": [3, 5], "b": [3, 5]} and data["synthesized"] is False


def test_no_size_runs_exits_2_naming_the_input_and_the_flag(tmp_path):
    path = save(reshaped_to(77), tmp_path / "odd.onnx")
    result = onnxlr_cli("verify", path, path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "input 'x'" in lines[0] and "--shape x:DIMS" in lines[0] and "--inputs FILE.npz" in lines[0]
    assert "1x16, 1x128, 1x512, 1x16000" in lines[0]
    assert onnxlr_cli("verify", path, path, "--shape", "x:2x77").returncode == 0
    with pytest.raises(OnnxlrError, match="--shape x:DIMS"):
        synthesis.feeds_the_model_accepts(path, specs_of(reshaped_to(77)))


def test_bench_uses_the_sizes_the_model_accepts(tmp_path):
    path = save(audio_front_end(), tmp_path / "vad.onnx")
    out = tmp_path / "bench.json"
    result = onnxlr_cli("bench", path, "--runs", "2", "--warmup", "0", "--json", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["inputs"] == {"wav": [1, 128], "state": [2, 1, 64], "sr": []}
    assert "inputs (synthesized): wav 1x128" in result.stdout


# ----------------------------------------------------------------------------- who is blamed


def test_a_candidate_that_fails_at_run_time_is_a_failed_verification(tmp_path):
    reference = save(reshaped_to(77), tmp_path / "ref.onnx")
    candidate = save(reshaped_to(70), tmp_path / "cand.onnx")  # (batch, 7, 10) from 77 values: fails to run
    result, data = verify_json(tmp_path, reference, candidate, "--shape", "x:2x77")
    assert result.returncode == 1, result.stderr
    assert "the candidate fails on cpu" in result.stderr and "Traceback" not in result.stderr
    assert data["passed"] is False


def test_a_reference_that_fails_is_bad_input_even_when_the_candidate_runs(tmp_path):
    reference = save(reshaped_to(70), tmp_path / "ref.onnx")
    candidate = save(reshaped_to(77), tmp_path / "cand.onnx")
    result = onnxlr_cli("verify", reference, candidate, "--shape", "x:2x77")
    assert result.returncode == 2
    assert "cannot run the reference model on cpu" in result.stderr


def test_a_candidate_whose_sizes_differ_is_not_probed(tmp_path):
    """The ladder runs the reference only: a candidate that fails at every size is still the one blamed."""
    reference = save(stride_net(levels=5), tmp_path / "ref.onnx")
    candidate = save(stride_net(levels=7), tmp_path / "cand.onnx")  # needs 128x128: fails at 32x32
    result, _ = verify_json(tmp_path, reference, candidate, "--samples", "1")
    assert result.returncode == 1, result.stderr
    assert "the candidate fails on cpu" in result.stderr


# ----------------------------------------------------------------------------- in segments: no probe pass


def verify_in_segments(path: str, monkeypatch, providers: str = "cpu") -> tuple[object, int]:
    """optimize's verification of the model against itself, in segments (as for a model larger than memory),
    on synthesized inputs; returns the result and how many passes over the model in segments it took."""
    import onnxlr.verification.segments
    from onnxlr.job import VerifySettings, verify_models

    passes = []
    whole_run = onnxlr.verification.segments.run_in_segments
    monkeypatch.setattr(onnxlr.verification.segments, "run_in_segments", lambda *a, **k: passes.append(1) or whole_run(*a, **k))
    checks = VerifySettings(providers=tuple(providers.split(",")), samples=2)
    result = verify_models(path, path, ir.load(path), checks, segment_budget=1000)
    return result, len(passes)


def test_in_segments_the_reference_run_is_the_probe(tmp_path, monkeypatch):
    # A probe in segments is a whole pass over the weights: the first sizes go straight to the reference run.
    result, passes = verify_in_segments(save(stride_net(levels=5), tmp_path / "net.onnx"), monkeypatch)
    assert result.passed and result.inputs == {"x": [2, 3, 32, 32]} and result.synthesized
    assert passes == 2  # the reference and the candidate, nothing else


def test_in_segments_a_reference_that_refuses_the_first_sizes_is_probed(tmp_path, monkeypatch):
    result, passes = verify_in_segments(save(stride_net(levels=6), tmp_path / "net.onnx"), monkeypatch)
    assert result.passed and result.inputs == {"x": [2, 3, 64, 64]} and result.synthesized
    assert passes == 1 + 2 + 2  # the refused reference run, probes at 32 and 64, then both models


def test_in_segments_a_reference_failing_on_a_later_provider_is_not_probed(tmp_path, monkeypatch):
    # The reference ran on the first provider with these inputs: a failure on the next one is that provider's,
    # and probing other sizes (a pass over the weights each) would only fail the same way again.
    import onnxlr.verification.verify

    calls = []
    real_run = onnxlr.verification.verify._run_segmented

    def fail_third_run(*args, **kwargs):  # reference and candidate on "cpu", then the reference again
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected: this provider cannot run the model")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(onnxlr.verification.verify, "_run_segmented", fail_third_run)
    with pytest.raises(OnnxlrError, match="cannot run the reference model on cpu") as raised:
        verify_in_segments(save(stride_net(levels=5), tmp_path / "net.onnx"), monkeypatch, providers="cpu,cpu")
    assert not isinstance(raised.value, onnxlr.verification.verify.ReferenceFailed)
    assert len(calls) == 3  # no probe, no second verification
