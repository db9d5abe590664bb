"""Data-aware planning: error compensation, sensitivity-weighted budgets, MAC budgets, --target-cosine.

Every figure here is measured with onnxruntime on a held-out draw of the calibration distribution.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import (
    ANISOTROPIC_WIDTH,
    anisotropic,
    init,
    make_model,
    onnxlr_cli,
    output_error,
    run,
    tensor_input,
)
from onnx import helper

import onnxlr
from onnxlr import OnnxlrError

K = ANISOTROPIC_WIDTH


def deep_mlp(widths=(K, 32, 32, 32, 8), seed=11) -> onnx.ModelProto:
    """MatMul -> Add -> Relu chains: each layer's input depends on every earlier layer's error."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for index, (rows, cols) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [init(f"W{index}", (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)),
                  init(f"b{index}", rng.standard_normal(cols).astype(np.float32) * 0.1)]
        nodes += [helper.make_node("MatMul", [current, f"W{index}"], [f"h{index}"], name=f"fc{index}"),
                  helper.make_node("Add", [f"h{index}", f"b{index}"], [f"a{index}"])]
        current = f"a{index}"
        if index < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    return make_model(nodes, [tensor_input("x", ["batch", widths[0]])], [tensor_input("y", ["batch", widths[-1]])],
                      inits)


def feeds(count: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": anisotropic(count, seed)}


def factorized_fraction(report: dict, measure: str) -> tuple[int, int]:
    rows = [row for row in report["layers"] if row["status"] == "factorized" or row["reason_code"] == "kept_dense_by_budget"]
    return sum(r[f"{measure}_after"] for r in rows), sum(r[f"{measure}_before"] for r in rows)


def test_compensation_lowers_the_output_error_further():
    model = deep_mlp()
    calib, held_out = feeds(512, seed=1), feeds(256, seed=2)
    settings = dict(rank=4, calibration=[calib], methods=("svd",))  # per-matrix: every layer compensated
    whitened, report = onnxlr.optimize(model, **settings, verify=False)
    compensated, compensated_report = onnxlr.optimize(model, compensate=True, **settings, verify=False)
    assert [r["rank"] for r in report["layers"]] == [r["rank"] for r in compensated_report["layers"]]
    assert compensated_report["calibration"]["refitted"] == 3  # every layer after the first
    plain_error = output_error(model, onnxlr.optimize(model, rank=4, verify=False)[0], held_out)
    whitened_error = output_error(model, whitened, held_out)
    compensated_error = output_error(model, compensated, held_out)
    assert whitened_error < plain_error
    assert compensated_error < 0.9 * whitened_error, (compensated_error, whitened_error)


@pytest.mark.parametrize("measure", ["params", "macs"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_budget_is_met_with_and_without_calibration(measure, budget):
    model = deep_mlp()
    for calibration in (None, [feeds(256, seed=1)]):
        report = onnxlr.optimize(model, **{f"{measure[:-1] if measure == 'macs' else 'param'}_budget": budget},
                                 calibration=calibration, verify=False)[1]
        after, before = factorized_fraction(report, measure)
        total = sum(r[f"{measure}_before"] for r in report["layers"])
        assert after + (total - before) <= budget * total  # dense layers count whole
        step = max(r["params_before"] for r in report["layers"])  # one rank step is far below one layer
        assert after + (total - before) >= budget * total - step


def test_measured_sensitivity_spends_the_budget_where_the_output_moves():
    """Two weights with the same spectrum; the second one's output is scaled by 1e-3 before the sum,
    so its error barely reaches the model's output. Weight energy alone cannot tell them apart."""
    rng = np.random.default_rng(5)
    shared = (rng.standard_normal((K, K)) / 4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W_loud"], ["loud"], name="loud"),
             helper.make_node("MatMul", ["x", "W_quiet"], ["quiet"], name="quiet"),
             helper.make_node("Mul", ["quiet", "tiny"], ["scaled"]),
             helper.make_node("Add", ["loud", "scaled"], ["y"])]
    model = make_model(nodes, [tensor_input("x", ["batch", K])], [tensor_input("y", ["batch", K])],
                       [init("W_loud", shared), init("W_quiet", shared.copy()),
                        init("tiny", np.array(1e-3, np.float32))])
    plain = {r["name"]: r for r in onnxlr.optimize(model, param_budget=0.5, verify=False)[1]["layers"]}
    assert plain["loud"]["rank"] == plain["quiet"]["rank"]  # same spectra: the same share
    measured = {r["name"]: r for r in onnxlr.optimize(model, param_budget=0.5,
                                                      calibration=[feeds(256, seed=1)], verify=False)[1]["layers"]}
    loud_rank = measured["loud"]["rank"] or K  # dense counts as full rank
    quiet_rank = measured["quiet"]["rank"] if measured["quiet"]["status"] == "factorized" else K
    assert loud_rank > quiet_rank, measured


def test_target_cosine_is_met_on_the_held_out_samples():
    model = deep_mlp()
    calib, held_out = feeds(256, seed=1), feeds(128, seed=2)
    candidate, report = onnxlr.optimize(model, target_cosine=0.999, calibration=[calib], heldout=[held_out], verify=False)
    reference, = run(model, held_out)
    output, = run(candidate, held_out)
    cosine = float(np.dot(reference.ravel(), output.ravel())
                   / (np.linalg.norm(reference) * np.linalg.norm(output)))
    assert cosine >= 0.999 - 1e-4  # float32 onnxruntime vs the planner's measurement
    assert report["calibration"]["search"], report["calibration"]
    assert report["totals"]["factorized"] >= 1  # the target is reachable with some compression
    assert report["totals"]["params_after"] < report["totals"]["params_before"]


def test_target_cosine_and_compensate_need_calibration(tmp_path):
    # The Python API names its keywords, the CLI its flags.
    with pytest.raises(OnnxlrError, match=r"^target_cosine needs calibration data \(calibration\)"):
        onnxlr.optimize(deep_mlp(), target_cosine=0.99, verify=False)
    with pytest.raises(OnnxlrError, match=r"^compensate needs calibration data \(calibration\)"):
        onnxlr.optimize(deep_mlp(), rank=4, compensate=True, verify=False)
    onnx.save(deep_mlp(), tmp_path / "m.onnx")
    result = onnxlr_cli("optimize", str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--rank", "4", "--compensate")
    assert result.returncode == 2
    assert "onnxlr: error: --compensate needs calibration data (--calibration)" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_mac_budget_on_convs_counts_macs_not_parameters():
    """A stride-1 conv on a large map and a Gemm head: the conv holds the MACs, the head the parameters."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], name="head", transB=1)]
    model = make_model(nodes, [tensor_input("x", [1, 32, 16, 16])], [tensor_input("y", [1, 64])],
                       [init("K", rng.standard_normal((32, 32, 3, 3)).astype(np.float32)),
                        init("W", (rng.standard_normal((64, 32 * 16 * 16)) * 0.01).astype(np.float32))])
    report = onnxlr.optimize(model, mac_budget=0.5, verify=False)[1]
    after, before = factorized_fraction(report, "macs")
    total = sum(r["macs_before"] for r in report["layers"])
    assert after + (total - before) <= 0.5 * total
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv"]["status"] == "factorized"  # only the conv can pay for half the MACs
    with pytest.raises(OnnxlrError, match="choose one rank policy"):
        onnxlr.optimize(model, mac_budget=0.5, param_budget=0.5, verify=False)


def test_target_error_is_met_on_the_held_out_samples():
    model = deep_mlp()
    calib, held_out = feeds(256, seed=1), feeds(128, seed=2)
    candidate, report = onnxlr.optimize(model, target_error=0.05, calibration=[calib], heldout=[held_out], verify=False)
    assert output_error(model, candidate, held_out) <= 0.05 + 1e-4
    assert all("error" in step for step in report["calibration"]["search"])
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    with pytest.raises(OnnxlrError, match="target_error must be a positive number"):
        onnxlr.optimize(model, target_error=-1.0, calibration=[calib], heldout=[held_out], verify=False)
