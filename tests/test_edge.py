"""Edge latency estimates: roofline arithmetic, the device profiles, user targets and the CLI JSON."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import init, make_model, onnxlr_cli, tensor_input
from onnx import helper

from onnxlr.errors import OnnxlrError
from onnxlr.factorize.cost import NodeCost
from onnxlr.timing import edge

USER_TARGET = """
[my-board]
name = "My board"
kind = "cpu"
[my-board.peak_gflops.fp32]
value = 10.0
source = "my measurement"
derived = false
[my-board.bandwidth_gbs]
value = 2.0
source = "LPDDR spec sheet"
derived = true
derivation = "1000 MT/s x 2 bytes"
[my-board.overhead_us]
value = 1.0
source = "guess"
derived = true
derivation = "assumed"
"""


def cost(flops=0, weight_bytes=0, input_bytes=0, output_bytes=0, name="n"):
    return NodeCost(name=name, op_type="MatMul", macs=flops // 2, flops=flops, weight_bytes=weight_bytes,
                    input_bytes=input_bytes, output_bytes=output_bytes, unknown_dims=False)


def figure(value):
    return edge.Figure(value=value, source="test", derived=False)


def target(peak=10.0, bandwidth=2.0, overhead=1.0, fp16=None):
    peaks = {"fp32": figure(peak)} | ({"fp16": figure(fp16)} if fp16 else {})
    return edge.Target(key="t", name="T", kind="cpu", peak_gflops=peaks, bandwidth_gbs=figure(bandwidth),
                       overhead_us=figure(overhead), origin="test")


def test_roofline_compute_bound_node():
    # 1e9 FLOPs at 10 GFLOP/s = 0.1 s; 1e6 bytes at 2 GB/s = 0.5 ms; + 1 us overhead.
    seconds, bound = edge.node_time_s(cost(flops=10**9, weight_bytes=10**6), 10.0, 2.0, 1.0)
    assert bound == "compute"
    assert seconds == pytest.approx(0.1 + 1e-6)


def test_roofline_memory_bound_node_counts_all_bytes():
    # 1e6 FLOPs = 0.1 ms; 2e8 + 1e8 + 1e8 bytes at 2 GB/s = 0.2 s.
    seconds, bound = edge.node_time_s(cost(flops=10**6, weight_bytes=2 * 10**8, input_bytes=10**8,
                                           output_bytes=10**8), 10.0, 2.0, 0.0)
    assert bound == "memory"
    assert seconds == pytest.approx(0.2)


def test_estimate_sums_nodes_with_overhead_and_falls_back_to_fp32():
    costs = [cost(flops=10**9), cost(weight_bytes=2 * 10**9), cost()]  # 0.1 s, 1 s, overhead only
    result = edge.estimate(costs, target(overhead=1000.0), "fp16")
    assert result["estimate_ms"] == pytest.approx((0.1 + 1.0 + 3 * 1e-3) * 1e3)
    assert result["compute_bound_nodes"] == 1 and result["memory_bound_nodes"] == 2
    assert result["precision"] == "fp32"  # no fp16 figure on this target
    faster = edge.estimate(costs, target(overhead=1000.0, fp16=20.0), "fp16")
    assert faster["precision"] == "fp16"
    assert faster["estimate_ms"] == pytest.approx((0.05 + 1.0 + 3 * 1e-3) * 1e3)


def test_before_after_speedup():
    result = edge.before_after([cost(flops=4 * 10**9)], [cost(flops=10**9)], {"t": target(overhead=0.0)}, "fp32")
    assert result["t"]["speedup_estimate"] == pytest.approx(4.0)
    assert result["t"]["label"] == "estimate (roofline)"


def test_builtin_profiles_have_a_source_and_derived_flag_for_every_figure():
    targets = edge.load_targets()
    assert {"rpi4", "rpi5", "jetson-orin-nano", "snapdragon-8-gen-2", "laptop-i7-1265u"} <= set(targets)
    for t in targets.values():
        assert t.origin == edge.BUILTIN and "fp32" in t.peak_gflops
        for f in [*t.peak_gflops.values(), t.bandwidth_gbs, t.overhead_us]:
            assert f.source.strip() and isinstance(f.derived, bool)
            assert f.derivation.strip() or not f.derived
    assert targets["rpi5"].bandwidth_gbs.value == pytest.approx(4267 * 4 / 1000, rel=1e-3)
    assert targets["jetson-orin-nano"].bandwidth_gbs.value == 68.0


def test_user_file_adds_a_target(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(USER_TARGET)
    targets = edge.load_targets(path)
    assert targets["my-board"].origin == str(path) and "rpi4" in targets


@pytest.mark.parametrize("text, message", [
    ("[a\nb = ", "not valid TOML"),
    (USER_TARGET.replace('source = "guess"\n', ""), "source must say"),
    (USER_TARGET.replace("value = 10.0", 'value = "fast"'), "value must be a number"),
    (USER_TARGET.replace('derivation = "assumed"\n', ""), "needs a derivation"),
    (USER_TARGET.replace("peak_gflops.fp32", "peak_gflops.int8"), "fp32"),
    (USER_TARGET.replace('kind = "cpu"', 'knd = "cpu"'), "unknown key"),
])
def test_malformed_user_file_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(OnnxlrError, match=message):
        edge.load_targets(path)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def mlp(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, [tensor_input("x", ["batch", 128])], [tensor_input("y", ["batch", 128])],
                       [init("W", rng.standard_normal((128, 128)).astype(np.float32))])
    onnx.save(model, tmp_path / "a.onnx")
    return tmp_path / "a.onnx"


def test_cli_refuses_a_malformed_targets_file(mlp, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(USER_TARGET.replace("value = 2.0", "value = -2.0"))
    for args in (["bench", mlp, "--runs", "2", "--targets", bad],
                 ["optimize", mlp, tmp_path / "out.onnx", "--targets", bad]):
        result = onnxlr_cli(*args)
        assert result.returncode == 2, result.stderr
        assert "bandwidth_gbs" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_bench_json_carries_target_estimates(mlp, tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text(USER_TARGET)
    result = onnxlr_cli("bench", mlp, "--compare", mlp, "--runs", "2", "--warmup", "0", "--targets", user,
                        "--json", tmp_path / "bench.json")
    assert result.returncode == 0, result.stderr
    assert "ESTIMATE" in result.stdout
    targets = json.loads((tmp_path / "bench.json").read_text())["targets"]
    assert {"rpi4", "my-board"} <= set(targets)
    entry = targets["my-board"]
    assert entry["source"] == str(user) and entry["label"] == "estimate (roofline)"
    assert entry["figures"]["bandwidth_gbs"]["source"] == "LPDDR spec sheet"
    assert len(entry["models"]) == 2 and entry["speedup_estimate"] == pytest.approx(1.0)
    assert entry["models"][0]["estimate_ms"] > 0


def test_optimize_report_carries_before_after_estimates(mlp, tmp_path):
    result = onnxlr_cli("optimize", mlp, tmp_path / "out.onnx", "--rank-ratio", "0.1", "--no-gate", "--report",
                        tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    targets = json.loads((tmp_path / "r.json").read_text())["targets"]
    entry = targets["rpi4"]
    assert entry["source"] == edge.BUILTIN and entry["figures"]["overhead_us"]["source"]
    assert entry["after"]["estimate_ms"] < entry["before"]["estimate_ms"]
    assert entry["speedup_estimate"] > 1
