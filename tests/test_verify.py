"""onnxlr verify: metrics, gates, inputs (given and synthesized), providers, and the gate in optimize."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, tensor_input
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr.model_io import inputs
from onnxlr.verification import runtime
from onnxlr.verification import verify as v

RNG = np.random.default_rng(3)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxlr", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def classifier(weight_scale=1.0):
    """x (batch, 32) -> Gemm -> Relu -> MatMul -> scores (batch, 10); plus a second output."""
    w1 = RNG.standard_normal((32, 64)).astype(np.float32) * weight_scale
    w2 = RNG.standard_normal((64, 10)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["scores"], name="fc2"),
             helper.make_node("ReduceMean", ["r"], ["pooled"], axes=[1], keepdims=0)]
    return make_model(nodes, [tensor_input("x", ["batch", 32])],
                      [tensor_input("scores", ["batch", 10]), tensor_input("pooled", ["batch"])],
                      [init("W1", w1), init("W2", w2)], opset=17)


@pytest.fixture()
def paths(tmp_path):
    reference = tmp_path / "ref.onnx"
    onnx.save(classifier(), reference)
    damaged = onnx.load(reference)
    for tensor in damaged.graph.initializer:
        if tensor.name == "W2":  # damage only what feeds `scores`
            array = numpy_helper.to_array(tensor).copy()
            array[:, 3] *= -4.0
            tensor.CopyFrom(numpy_helper.from_array(array, "W2"))
    damaged_path = tmp_path / "damaged.onnx"
    onnx.save(damaged, damaged_path)
    return reference, damaged_path


def test_model_verified_against_itself_passes(paths, tmp_path):
    reference, _ = paths
    result = cli("verify", reference, reference, "--atol", "0", "--min-cosine", "0.999999", "--json", tmp_path / "v.json")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["passed"]
    scores = data["providers"]["cpu"]["outputs"]["scores"]
    assert scores["max_abs"] == 0.0 and scores["cosine"] == pytest.approx(1.0) and scores["top1_agreement"] == 1.0


def test_damaged_copy_fails_naming_the_output(paths):
    reference, damaged = paths
    result = cli("verify", reference, damaged, "--min-cosine", "0.99")
    assert result.returncode == 1
    assert "output 'scores' on cpu" in result.stderr
    assert "pooled" not in result.stderr  # the untouched output passes
    assert "Traceback" not in result.stderr


def test_atol_rtol_semantics():
    reference = np.array([[1.0, 100.0]])
    candidate = np.array([[1.5, 101.0]])
    assert v.compare_arrays(reference, candidate, v.Gates(atol=0.5, rtol=0.01))["passed"]
    assert not v.compare_arrays(reference, candidate, v.Gates(atol=0.4, rtol=0.01))["passed"]
    assert not v.compare_arrays(reference, candidate, v.Gates(atol=0.5, rtol=0.004))["passed"]
    metrics = v.compare_arrays(reference, candidate, v.Gates())
    assert metrics["max_abs"] == 1.0 and metrics["max_rel"] == 0.5
    assert metrics["snr_db"] == pytest.approx(10 * np.log10((1 + 100**2) / (0.25 + 1)))


def test_new_nan_always_fails():
    metrics = v.compare_arrays(np.ones((2, 3)), np.array([[1, np.nan, 1], [1, 1, 1]]), v.Gates())
    assert not metrics["passed"] and "NaN" in metrics["failure"]


def test_synthesized_token_ids_stay_inside_the_embedding_table():
    table = RNG.standard_normal((50, 8)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["E", "ids32"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["y"])]
    model = make_model(nodes, [tensor_input("input_ids", ["batch", "seq"], TensorProto.INT64),
                               tensor_input("attention_mask", ["batch", "seq"], TensorProto.INT64)],
                       [tensor_input("y", ["batch", "seq", 8])],
                       [init("E", table), init("axes", np.array([2], dtype=np.int64))])
    specs = inputs.input_specs(ir.serde.deserialize_model(model))
    assert specs["input_ids"].high == 50
    feeds = inputs.synthesize_inputs(specs, seed=1, samples=4, shapes={"input_ids": (4, 300)})
    assert feeds["input_ids"].shape == (4, 300) and feeds["input_ids"].max() < 50
    # attention_mask shares input_ids' named dims, so --shape sizes it too.
    assert feeds["attention_mask"].shape == (4, 300) and np.all(feeds["attention_mask"] == 1)


def test_input_files_are_checked(tmp_path, paths):
    reference, _ = paths
    specs = inputs.input_specs(ir.load(reference))
    np.savez(tmp_path / "ok.npz", x=RNG.standard_normal((5, 32)).astype(np.float32))
    assert inputs.load_inputs(tmp_path / "ok.npz", specs)["x"].shape == (5, 32)
    np.savez(tmp_path / "wrong_name.npz", y=np.zeros((5, 32), np.float32))
    np.savez(tmp_path / "wrong_dtype.npz", x=np.zeros((5, 32), np.float64))
    (tmp_path / "not.npz").write_text("hello")
    for name, message in (("wrong_name", "no array for model input"), ("wrong_dtype", "float64"),
                          ("not", "not a readable .npz"), ("missing", "no such input file")):
        with pytest.raises(OnnxlrError, match=message):
            inputs.load_inputs(tmp_path / f"{name}.npz", specs)
    result = cli("verify", reference, reference, "--inputs", tmp_path / "wrong_name.npz")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_shape_overrides_parse_and_refuse():
    assert inputs.parse_shape_overrides(["input_ids:1x128", "a:b:3"]) == {"input_ids": (1, 128), "a:b": (3,)}
    for bad in ("input_ids", "x:1xq", ":3", "x:-1"):
        with pytest.raises(OnnxlrError):
            inputs.parse_shape_overrides([bad])


def test_unknown_provider_is_refused():
    with pytest.raises(OnnxlrError, match="unknown execution provider"):
        runtime.parse_providers(["tpu"])


def test_per_layer_errors_name_each_factorized_node(tmp_path, paths):
    reference, _ = paths
    candidate = tmp_path / "lr.onnx"
    result = cli("optimize", reference, candidate, "--rank", "4", "--no-verify", "-q")
    assert result.returncode == 0, result.stderr
    result = cli("verify", reference, candidate, "--per-layer", "--json", tmp_path / "v.json", "--no-gate")
    assert result.returncode == 0, result.stderr
    layers = json.loads((tmp_path / "v.json").read_text())["providers"]["cpu"]["layers"]
    assert set(layers) == {"h", "scores"}  # the outputs of fc1 and fc2, kept under their names
    assert all(metrics["max_abs"] > 0 for metrics in layers.values())


def test_optimize_gate_failure_writes_nothing(tmp_path, paths):
    reference, _ = paths
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    result = cli("optimize", reference, out, "--rank", "1", "--min-cosine", "0.9999", "--report", report)
    assert result.returncode == 1
    assert "verification failed" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.onnxlr-tmp"))
    assert json.loads(report.read_text())["verification"]["passed"] is False
    result = cli("optimize", reference, out, "--rank", "1", "--min-cosine", "0.9999", "--keep-failed")
    assert result.returncode == 1 and out.exists()


def test_optimize_records_verification_in_report(tmp_path, paths):
    reference, _ = paths
    report = tmp_path / "report.json"
    result = cli("optimize", reference, tmp_path / "out.onnx", "--rank", "8", "--report", report, "--min-cosine", "0.5")
    assert result.returncode == 0, result.stderr
    verification = json.loads(report.read_text())["verification"]
    assert verification["passed"] and verification["gated"] and set(verification["providers"]["cpu"]["outputs"]) == {"scores", "pooled"}


@pytest.mark.skipif("cuda" not in runtime.default_providers(), reason="needs onnxruntime-gpu and a visible GPU")
def test_cuda_provider_runs_and_reports_noise_against_cpu(paths, tmp_path):
    reference, _ = paths
    result = cli("verify", reference, reference, "--providers", "cpu,cuda", "--json", tmp_path / "v.json")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["providers"]["cuda"]["session_providers"][0] == "CUDAExecutionProvider"
    assert data["providers"]["cuda"]["reference_vs_cpu"]["scores"]["cosine"] > 0.9999
