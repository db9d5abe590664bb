"""Activation-whitened SVD from calibration data: real onnxruntime runs, no mocks.

The inputs are strongly anisotropic (correlated, non-zero mean), which is where a weight-only SVD
spends its rank on directions the data never excites and whitening wins.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import (
    ANISOTROPIC_WIDTH,
    anisotropic,
    assert_outputs_close,
    init,
    make_model,
    onnxlr_cli,
    output_error,
    run,
    tensor_input,
)
from onnx import helper

import onnxlr
from onnxlr.calibrate import calibration
from onnxlr.factorize import lowrank

K = ANISOTROPIC_WIDTH


def weight(rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, cols)).astype(np.float32)


# Each case: (model, function turning (samples, K) vectors into the model's input feeds).
def matmul_right():
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [tensor_input("x", ["batch", 4, K])], [tensor_input("y", ["batch", 4, 12])],
                       [init("W", weight(K, 12))])
    return model, lambda v: {"x": v.reshape(-1, 4, K)}


def matmul_left():
    model = make_model([helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")],
                       [tensor_input("x", ["batch", K, 4])], [tensor_input("y", ["batch", 12, 4])],
                       [init("W", weight(12, K))])
    return model, lambda v: {"x": np.ascontiguousarray(v.reshape(-1, 4, K).transpose(0, 2, 1))}


def gemm_b_transposed():
    # op(A) = x (batch, K) through a Transpose and transA=1; B stored (N, K) with transB=1.
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Gemm", ["xt", "W", "c"], ["y"], name="gemm", transA=1, transB=1)]
    model = make_model(nodes, [tensor_input("x", ["batch", K])], [tensor_input("y", ["batch", 12])],
                       [init("W", weight(12, K)), init("c", np.ones(12, np.float32))])
    return model, lambda v: {"x": v}


def gemm_a():
    # Y = W (12, K) · op(B) with B = x (batch, K) and transB=1: the columns of op(B) are the samples.
    model = make_model([helper.make_node("Gemm", ["W", "x"], ["y"], name="gemm", transB=1)],
                       [tensor_input("x", ["batch", K])], [tensor_input("y", [12, "batch"])],
                       [init("W", weight(12, K))])
    return model, lambda v: {"x": v}


def gemm_a_transposed():
    # A stored (K, 12) with transA=1; op(B) = B (K, batch) from a Transpose.
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Gemm", ["W", "xt"], ["y"], name="gemm", transA=1)]
    model = make_model(nodes, [tensor_input("x", ["batch", K])], [tensor_input("y", [12, "batch"])],
                       [init("W", weight(K, 12))])
    return model, lambda v: {"x": v}


def mlp():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor_input("x", ["batch", K])], [tensor_input("y", ["batch", 8])],
                       [init("W1", weight(K, 24)), init("b1", rng.standard_normal(24).astype(np.float32)),
                        init("W2", rng.standard_normal((24, 8)).astype(np.float32))])
    return model, lambda v: {"x": v}


CASES = {"matmul_right": matmul_right, "matmul_left": matmul_left, "gemm_b_transposed": gemm_b_transposed,
         "gemm_a": gemm_a, "gemm_a_transposed": gemm_a_transposed, "mlp": mlp}


@pytest.mark.parametrize("case", sorted(CASES))
def test_whitened_beats_plain_svd_on_held_out_data(case):
    model, feeds = CASES[case]()
    calib, held_out = feeds(anisotropic(256, seed=1)), feeds(anisotropic(64, seed=2))
    plain, plain_report = onnxlr.optimize(model, rank=3, allow_no_gain=True, verify=False)
    whitened, report = onnxlr.optimize(model, rank=3, allow_no_gain=True, calibration=[calib], methods=("svd",), verify=False)
    assert {row["method"] for row in report["layers"] if row["status"] == "factorized"} == {"whitened"}
    assert {row["method"] for row in plain_report["layers"] if row["status"] == "factorized"} == {"svd"}
    plain_error, whitened_error = output_error(model, plain, held_out), output_error(model, whitened, held_out)
    assert whitened_error < 0.5 * plain_error, (whitened_error, plain_error)


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_rank_whitened_is_exact(case):
    model, feeds = CASES[case]()
    candidate, _ = onnxlr.optimize(model, rank_ratio=1.0, allow_no_gain=True,
                                   calibration=[feeds(anisotropic(128, seed=1))], verify=False)
    held_out = feeds(anisotropic(32, seed=2))
    assert_outputs_close(run(model, held_out), run(candidate, held_out), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["matmul_right", "matmul_left", "gemm_b_transposed", "gemm_a", "gemm_a_transposed"])
def test_gram_in_batches_equals_gram_at_once(case):
    model, feeds = CASES[case]()
    vectors = anisotropic(100, seed=5)  # 100 vectors: batches of 7 samples leave a short last batch
    grams = calibration.collect_grams(model.SerializeToString(), onnxlr.load(model).model, feeds(vectors),
                                      batch_size=7)
    assert len(grams) == 1
    expected = vectors.astype(np.float64).T @ vectors.astype(np.float64)
    np.testing.assert_allclose(next(iter(grams.values())), expected, rtol=1e-9, atol=1e-6)


def test_accumulator_streams_batches():
    vectors = anisotropic(50, seed=3).astype(np.float64)
    accumulator = calibration.GramAccumulator()
    for start in range(0, 50, 8):
        accumulator.add(vectors[start:start + 8])
    assert accumulator.count == 50
    np.testing.assert_allclose(accumulator.result(), vectors.T @ vectors, rtol=1e-12)


def test_calibration_samples_caps_the_data():
    model, feeds = matmul_right()
    vectors = anisotropic(40, seed=5)  # 10 samples of 4 vectors
    grams = calibration.collect_grams(model.SerializeToString(), onnxlr.load(model).model, feeds(vectors),
                                      samples=3, batch_size=2)
    first = vectors[:12].astype(np.float64)
    np.testing.assert_allclose(next(iter(grams.values())), first.T @ first, rtol=1e-9, atol=1e-6)


def test_rank_deficient_gram_falls_back_without_nans(caplog):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)) @ rng.standard_normal((3, K))  # rank 3 activations
    w = rng.standard_normal((K, 10))
    for damping in (0.0, 1e-6):
        with caplog.at_level("INFO", logger="onnxlr.factorize.lowrank"):
            decomposition = lowrank.whitened_svd(w[None], x.T @ x, damping=damping)
        if damping == 0.0:  # no damping: Cholesky of a singular matrix is refused, eigenvalues are clipped
            assert "clipped eigenvalues" in caplog.text
        a, b = decomposition.factors(3)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        # Rank 3 reproduces the outputs on data of rank 3 ...
        assert np.linalg.norm(x @ w - x @ (a[0] @ b[0])) <= 1e-4 * np.linalg.norm(x @ w)
        # ... and full rank is still the weight itself.
        a, b = decomposition.factors(decomposition.full_rank)
        np.testing.assert_allclose(a[0] @ b[0], w, rtol=1e-4, atol=1e-4)


def test_whitened_svd_columns_side_matches_rows_side():
    rng = np.random.default_rng(1)
    x = anisotropic(300, seed=4).astype(np.float64)
    w = rng.standard_normal((K, 9))
    rows = lowrank.whitened_svd(w[None], x.T @ x)
    cols = lowrank.whitened_svd(w.T[None], x.T @ x, side="cols")
    np.testing.assert_allclose(rows.s, cols.s, rtol=1e-8)
    a_rows, b_rows = rows.factors(4)
    a_cols, b_cols = cols.factors(4)
    np.testing.assert_allclose(a_rows[0] @ b_rows[0], (a_cols[0] @ b_cols[0]).T, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def model_file(tmp_path):
    model, _ = matmul_right()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def test_cli_calibration_file_and_folder(tmp_path, model_file):
    np.savez(tmp_path / "calib.npz", x=anisotropic(256, seed=1).reshape(-1, 4, K))
    folder = tmp_path / "parts"
    folder.mkdir()
    np.savez(folder / "a.npz", x=anisotropic(128, seed=1).reshape(-1, 4, K))
    np.savez(folder / "b.npz", x=anisotropic(128, seed=3).reshape(-1, 4, K))
    for source in (tmp_path / "calib.npz", folder):
        out, report = tmp_path / "out.onnx", tmp_path / "report.json"
        result = onnxlr_cli("optimize", model_file, out, "--rank", "3", "--allow-no-gain", "--no-gate", "--calibration",
                            source, "--calibration-samples", "50", "--report", report)
        assert result.returncode == 0, result.stderr
        rows = json.loads(report.read_text())["layers"]
        assert [row["method"] for row in rows] == ["whitened"]
        out.unlink()


def test_cli_external_data_model(tmp_path):
    model, _ = matmul_right()
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data",
              size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=anisotropic(64, seed=1).reshape(-1, 4, K))
    report = tmp_path / "report.json"
    result = onnxlr_cli("optimize", path, tmp_path / "out.onnx", "--rank", "3", "--allow-no-gain", "--no-gate",
                        "--calibration", tmp_path / "calib.npz", "--report", report)
    assert result.returncode == 0, result.stderr
    assert [row["method"] for row in json.loads(report.read_text())["layers"]] == ["whitened"]


def test_cli_calibration_samples_needs_calibration(tmp_path, model_file):
    result = onnxlr_cli("optimize", model_file, tmp_path / "out.onnx", "--calibration-samples", "8")
    assert result.returncode == 2 and "--calibration-samples needs --calibration" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("bad", ["missing_input", "wrong_dtype", "wrong_rank", "not_npz", "empty_folder"])
def test_cli_refuses_bad_calibration(tmp_path, model_file, bad):
    source = tmp_path / "calib.npz"
    good = anisotropic(32, seed=1).reshape(-1, 4, K)
    if bad == "missing_input":
        np.savez(source, other=good)
    elif bad == "wrong_dtype":
        np.savez(source, x=good.astype(np.float64))
    elif bad == "wrong_rank":
        np.savez(source, x=good.reshape(-1, K))
    elif bad == "not_npz":
        source.write_text("not an npz")
    else:
        source = tmp_path / "empty"
        source.mkdir()
    out = tmp_path / "out.onnx"
    result = onnxlr_cli("optimize", model_file, out, "--rank", "3", "--calibration", source)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_api_refuses_bad_calibration_items():
    model, _ = matmul_right()
    with pytest.raises(onnxlr.OnnxlrError, match="no array for model input"):
        onnxlr.optimize(model, rank=3, calibration=[{"y": np.zeros((2, 4, K), np.float32)}], verify=False)
    with pytest.raises(onnxlr.OnnxlrError, match="expected a dict"):
        onnxlr.optimize(model, rank=3, calibration=[np.zeros((2, 4, K), np.float32)], verify=False)
