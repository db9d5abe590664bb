"""onnxlr bench: statistics arithmetic and a real interleaved A/B run (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from graphs import init, make_model, tensor_input
from onnx import helper

from onnxlr.timing import bench


def test_summary_statistics():
    summary = bench.summarize([0.001, 0.002, 0.003, 0.004])
    assert summary["p50_ms"] == pytest.approx(2.5)
    assert summary["mean_ms"] == pytest.approx(2.5)
    assert summary["min_ms"] == pytest.approx(1.0)
    assert summary["std_ms"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert summary["runs"] == 4


def test_speedup_is_the_median_of_pairwise_ratios():
    result = bench.speedup([2.0, 4.0, 6.0, 100.0], [1.0, 1.0, 2.0, 50.0])
    assert result["median"] == pytest.approx(2.5)  # ratios 2, 4, 3, 2
    assert result["p10"] <= result["median"] <= result["p90"]


def test_bench_cli_compares_two_models(tmp_path):
    rng = np.random.default_rng(0)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [tensor_input("x", ["batch", 64])], [tensor_input("y", ["batch", 64])],
                       [init("W", rng.standard_normal((64, 64)).astype(np.float32))])
    onnx.save(model, tmp_path / "a.onnx")
    onnx.save(model, tmp_path / "b.onnx")
    result = subprocess.run([sys.executable, "-m", "onnxlr", "bench", tmp_path / "a.onnx", "--compare",
                             tmp_path / "b.onnx", "--runs", "10", "--warmup", "1", "--samples", "4",
                             "--json", tmp_path / "bench.json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout
    data = json.loads((tmp_path / "bench.json").read_text())["providers"]["cpu"]
    assert [m["runs"] for m in data["models"]] == [10, 10]
    assert data["speedup"]["p10"] <= data["speedup"]["median"] <= data["speedup"]["p90"]
    context = data["context"]
    assert context["intra_op_threads"] == 1 and context["inter_op_threads"] == 1
    assert context["onnxruntime"] and context["cpu"]
    assert data["session_providers"][0] == "CPUExecutionProvider"


def test_profile_attributes_kernel_time_to_each_factorized_layer(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "V"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor_input("x", ["batch", 128])], [tensor_input("y", ["batch", 64])],
                       [init("W", rng.standard_normal((128, 256)).astype(np.float32)),
                        init("V", rng.standard_normal((256, 64)).astype(np.float32))])
    onnx.save(model, tmp_path / "a.onnx")
    run = [sys.executable, "-m", "onnxlr"]
    subprocess.run([*run, "optimize", tmp_path / "a.onnx", tmp_path / "b.onnx", "--rank", "8", "-q", "--no-gate"], check=True,
                   timeout=120)
    result = subprocess.run([*run, "bench", tmp_path / "a.onnx", "--compare", tmp_path / "b.onnx", "--runs", "5",
                             "--profile", "--json", tmp_path / "bench.json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    profile = json.loads((tmp_path / "bench.json").read_text())["providers"]["cpu"]["profile"]
    assert [row["name"] for row in profile["layers"]] == ["fc1", "fc2"]
    for row in profile["layers"]:
        assert row["original_us"] > 0 and row["pair_us"] > 0 and row["speedup"] > 0
    result = subprocess.run([*run, "bench", tmp_path / "a.onnx", "--profile"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--compare" in result.stderr
