"""The default quality gate: a destroyed model is never called "passed", and an ungated output never "passes"."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import init, make_model, onnxlr_cli, tensor_input
from onnx import TensorProto, helper

from onnxlr.render.report import output_verdict, verification_verdict
from onnxlr.verification import verify

RNG = np.random.default_rng(7)


def scorer(weight: np.ndarray) -> onnx.ModelProto:
    """x -> scores (float) and their argmax class (int64): one float and one integer output."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["scores"], name="head"),
             helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0)]
    return make_model(nodes, [tensor_input("x", [None, 32])],
                      [tensor_input("scores", [None, 16]), tensor_input("label", [None], TensorProto.INT64)],
                      [init("W", weight)])


def test_verify_fails_a_badly_damaged_copy_by_default_and_names_the_figure(tmp_path):
    weight = RNG.standard_normal((32, 16)).astype(np.float32)
    onnx.save(scorer(weight), tmp_path / "a.onnx")
    onnx.save(scorer(RNG.standard_normal((32, 16)).astype(np.float32)), tmp_path / "damaged.onnx")
    result = onnxlr_cli("verify", tmp_path / "a.onnx", tmp_path / "damaged.onnx", "--json", tmp_path / "v.json")
    assert result.returncode == 1, result.stderr
    assert "output 'scores'" in result.stderr and "< 0.99 (the default gate" in result.stderr
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["gates"]["default"] is True and data["gated"] is True and data["passed"] is False
    # The integer output is judged by exact agreement, not by a cosine.
    label = data["providers"]["cpu"]["outputs"]["label"]
    assert "agreement" in label and label["gated"] == ["min_agreement"]


def test_verify_of_a_model_against_itself_passes_the_default_gate(tmp_path):
    onnx.save(scorer(RNG.standard_normal((32, 16)).astype(np.float32)), tmp_path / "a.onnx")
    result = onnxlr_cli("verify", tmp_path / "a.onnx", tmp_path / "a.onnx")
    assert result.returncode == 0, result.stderr
    assert "verification: passed" in result.stdout


def test_no_gate_compares_but_never_says_pass(tmp_path):
    onnx.save(scorer(RNG.standard_normal((32, 16)).astype(np.float32)), tmp_path / "a.onnx")
    onnx.save(scorer(RNG.standard_normal((32, 16)).astype(np.float32)), tmp_path / "damaged.onnx")
    result = onnxlr_cli("verify", tmp_path / "a.onnx", tmp_path / "damaged.onnx", "--no-gate")
    assert result.returncode == 0, result.stderr
    assert "not gated" in result.stdout and "verification: passed" not in result.stdout
    assert " pass " not in result.stdout.replace("│", " ")


def test_optimize_refuses_a_destroyed_model_and_writes_nothing(tmp_path):
    # A full-rank weight at rank 1 keeps a small share of its energy: the outputs are destroyed.
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "V"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor_input("x", [None, 64])], [tensor_input("y", [None, 64])],
                       [init("W", RNG.standard_normal((64, 64)).astype(np.float32)),
                        init("V", RNG.standard_normal((64, 64)).astype(np.float32))])
    onnx.save(model, tmp_path / "m.onnx")
    result = onnxlr_cli("optimize", tmp_path / "m.onnx", tmp_path / "out.onnx", "--rank", "1",
                        "--report", tmp_path / "r.json")
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("onnxlr: error: verification failed: output 'y' on cpu: cosine ")
    for hint in ("< 0.99", "--target-cosine", "--energy", "--keep-failed", "Nothing written"):
        assert hint in message, message
    assert not (tmp_path / "out.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["passed"] is False
    # The same run with the default gate off writes the model (the user asked for it).
    result = onnxlr_cli("optimize", tmp_path / "m.onnx", tmp_path / "out.onnx", "--rank", "1", "--no-gate")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.onnx").exists() and "not gated" in result.stdout


def test_gates_chosen_applies_the_default_only_without_gate_flags():
    assert verify.Gates.chosen() == verify.Gates(min_cosine=verify.DEFAULT_MIN_COSINE, default=True)
    assert verify.Gates.chosen(atol=1e-3) == verify.Gates(atol=1e-3)
    assert verify.Gates.chosen(min_cosine=0.5) == verify.Gates(min_cosine=0.5)
    assert verify.Gates.chosen(default_gate=False) == verify.Gates()


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_and_boolean_outputs_are_compared_by_exact_agreement(dtype):
    reference = (np.arange(200) % 3).astype(dtype)
    candidate = reference.copy()
    candidate[:3] = candidate[:3] == 0 if dtype == np.bool_ else candidate[:3] + 1  # 3 of 200 differ: 98.5%
    metrics = verify.compare_arrays(reference, candidate, verify.Gates.chosen())
    assert metrics["agreement"] == pytest.approx(0.985)
    assert not metrics["passed"] and "98.50% of elements agree exactly" in metrics["failure"]
    assert verify.compare_arrays(reference, candidate, verify.Gates(min_cosine=0.98))["passed"]


def test_verdicts_say_pass_only_for_gated_outputs():
    ungated = verify.compare_arrays(np.ones(4), np.ones(4), verify.Gates())
    gated = verify.compare_arrays(np.ones(4), np.ones(4), verify.Gates.chosen())
    assert output_verdict(ungated) == "not gated" and output_verdict(gated) == "pass"
    assert verification_verdict({"passed": True, "gated": False}).startswith("not gated")
    assert verification_verdict({"passed": True, "gated": True}) == "passed"
    assert verification_verdict({"passed": False, "gated": True}) == "FAILED"
