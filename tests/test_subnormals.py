"""No subnormal float is ever written (issue 30): x86 CPUs run arithmetic on them many times slower.

Weights with a dead row or channel scaled to 1e-39 (as trained models have: a real OCR export held 1,240 subnormal
values in one factor) make an SVD's factors hold subnormals in every rewrite family. Each family's output must hold
none in what onnxlr wrote, stay exact at full rank, and the report must count what was flushed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import assert_outputs_close, init, make_model, run, tensor_input
from onnx import helper, numpy_helper
from test_coupled import batches, redundant_mlp
from test_embeddings import embedding_model, ids
from test_rnn import feeds as rnn_feeds
from test_rnn import recurrent_model

import onnxlr
from onnxlr.factorize import subnormals

TINY = np.finfo(np.float32).tiny
DEAD = 1e-39  # a subnormal float32 scale: what a trained model's dead rows and channels hold


def with_dead_rows(model: onnx.ModelProto, names: tuple[str, ...] | None = None) -> onnx.ModelProto:
    """The model with the first row and the last column of each float weight (of `names`, else every one with two
    or more dims) scaled down to subnormal magnitudes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for tensor in result.graph.initializer:
        array = numpy_helper.to_array(tensor).copy()
        if array.dtype != np.float32 or array.ndim < 2 or (names is not None and tensor.name not in names):
            continue
        array[(slice(None),) * (array.ndim - 2) + (0,)] *= DEAD
        array[..., -1] *= DEAD
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return result


def written_subnormals(original: onnx.ModelProto, result: onnx.ModelProto) -> int:
    """Subnormal values in the float initializers `result` holds that `original` did not (what onnxlr wrote)."""
    before = {t.name for t in original.graph.initializer}
    return sum(subnormals.count(numpy_helper.to_array(t), ir.DataType(t.data_type))
               for t in result.graph.initializer if t.name not in before)


def model_subnormals(model: onnx.ModelProto) -> int:
    return sum(subnormals.count(numpy_helper.to_array(t), ir.DataType(t.data_type)) for t in model.graph.initializer)


def matmul(side: str) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(1)
    if side == "right":
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        x = rng.standard_normal((4, 24)).astype(np.float32)
        weight = rng.standard_normal((24, 20)).astype(np.float32)
    else:
        node = helper.make_node("MatMul", ["W", "x"], ["y"], name="layer")
        x = rng.standard_normal((24, 4)).astype(np.float32)
        weight = rng.standard_normal((20, 24)).astype(np.float32)
    return make_model([node], [tensor_input("x", list(x.shape))], [tensor_input("y", None)], [init("W", weight)]), \
        {"x": x}


def gemm() -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(2)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="layer", transB=1, alpha=0.5, beta=2.0)
    inits = [init("W", rng.standard_normal((20, 24)).astype(np.float32)),
             init("C", rng.standard_normal(20).astype(np.float32))]
    x = rng.standard_normal((4, 24)).astype(np.float32)
    return make_model([node], [tensor_input("x", [4, 24])], [tensor_input("y", None)], inits), {"x": x}


def conv(group: int = 1) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(3)
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="layer", pads=[1, 1, 1, 1], group=group)
    inits = [init("W", rng.standard_normal((16, 16 // group, 3, 3)).astype(np.float32)),
             init("B", rng.standard_normal(16).astype(np.float32))]
    x = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    return make_model([node], [tensor_input("x", [2, 16, 6, 6])], [tensor_input("y", None)], inits), {"x": x}


def lstm() -> tuple[onnx.ModelProto, dict]:
    model = recurrent_model("LSTM", input_size=12, hidden=3, bias=True)
    return model, rnn_feeds(model)


def table() -> tuple[onnx.ModelProto, dict]:
    return embedding_model(), ids(5, 3)


FAMILIES = {
    "matmul-right": (lambda: matmul("right"), {}),
    "matmul-left": (lambda: matmul("left"), {}),
    "gemm": (gemm, {}),
    "conv-output": (conv, {"conv_scheme": "output"}),
    "conv-input": (conv, {"conv_scheme": "input"}),
    "conv-spatial": (conv, {"conv_scheme": "spatial"}),
    "conv-grouped": (lambda: conv(group=2), {}),
    "lstm": (lstm, {}),
    "gather-table": (table, {"ops": ("Gather",)}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_family_writes_a_subnormal_and_full_rank_stays_exact(family):
    build, options = FAMILIES[family]
    original, feeds = build()
    model = with_dead_rows(original)
    assert model_subnormals(model) > 0  # the input holds them: its dead rows
    result, report = onnxlr.optimize(model, rank_ratio=1.0, allow_no_gain=True, **options, verify=False)
    assert report["totals"]["factorized"] >= 1, report["layers"]
    assert written_subnormals(model, result) == 0
    assert report["totals"]["subnormals_flushed"] > 0  # the SVD of a dead row's weight puts them in the factors
    assert_outputs_close(run(model, feeds), run(result, feeds), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["matmul-right", "conv-output", "conv-spatial"])
def test_truncated_factors_hold_no_subnormal(family):
    build, options = FAMILIES[family]
    model = with_dead_rows(build()[0])
    result, report = onnxlr.optimize(model, rank_ratio=0.25, **options, verify=False)
    assert report["totals"]["factorized"] == 1
    assert written_subnormals(model, result) == 0 and report["totals"]["subnormals_flushed"] > 0


def test_joint_pair_slices_and_compensated_refits_hold_no_subnormal():
    model = with_dead_rows(redundant_mlp(), names=("W1", "W2"))
    joint_model, report = onnxlr.optimize(model, calibration=batches(6), param_ratio=0.5, methods=("svd", "joint"), verify=False)
    assert {row["method"] for row in report["layers"]} == {"joint"}
    assert written_subnormals(model, joint_model) == 0 and report["totals"]["subnormals_flushed"] > 0
    refitted, report = onnxlr.optimize(model, calibration=batches(6), rank_ratio=0.5, methods=("svd",),
                                       compensate=True, verify=False)
    assert report["totals"]["factorized"] == 2
    assert written_subnormals(model, refitted) == 0 and report["totals"]["subnormals_flushed"] > 0


def test_clean_weights_flush_nothing_and_a_dry_run_counts_nothing():
    model, _ = matmul("right")
    _, report = onnxlr.optimize(model, rank_ratio=0.5, verify=False)
    assert report["totals"]["subnormals_flushed"] == 0
    _, planned = onnxlr.optimize(with_dead_rows(model), rank_ratio=0.5, dry_run=True, verify=False)
    assert "subnormals_flushed" not in planned["totals"]


@pytest.mark.parametrize("dtype,flushed", [(ir.DataType.FLOAT, 2), (ir.DataType.DOUBLE, 1),
                                           (ir.DataType.BFLOAT16, 2), (ir.DataType.FLOAT16, 0)])
def test_flush_by_dtype(dtype, flushed):
    # float32 and bfloat16 flush below float32's smallest normal, float64 below its own; float16 keeps its
    # subnormals (CPU kernels widen them to normal float32 values, and they carry real precision).
    values = np.array([1.0, -TINY / 4, TINY / 2, TINY, 0.0, -0.0, 1e-310], dtype=np.float64)
    array = values.astype(dtype.numpy()) if dtype != ir.DataType.FLOAT16 else np.array([1.0, 3e-6, 6e-8], np.float16)
    before = array.copy()
    assert subnormals.flush(array, dtype) == flushed
    assert subnormals.count(array, dtype) == 0 or dtype == ir.DataType.FLOAT16
    changed = np.flatnonzero(array.astype(np.float64) != before.astype(np.float64))
    assert len(changed) == flushed and np.all(array.astype(np.float64)[changed] == 0)


def test_add_initializer_flushes_a_copy_and_records_the_count():
    from onnxlr.factorize.rewrite import add_initializer

    graph = ir.Graph([], [], nodes=[], opset_imports={"": 17})
    array = np.array([[1.0, TINY / 8], [TINY / 16, 2.0]], np.float64)
    value = add_initializer(graph, "w", array, ir.DataType.FLOAT)
    assert value.const_value.numpy().tolist() == [[1.0, 0.0], [0.0, 2.0]]
    assert value.meta[subnormals.META_KEY] == 2 and subnormals.flushed_in([value]) == 2
    assert array[0, 1] == TINY / 8  # the caller's array is left as it was


def test_the_cli_prints_what_it_flushed(tmp_path):
    from graphs import onnxlr_cli

    model = with_dead_rows(conv()[0])
    source = tmp_path / "dead.onnx"
    onnx.save(model, source)
    result = onnxlr_cli("optimize", source, tmp_path / "out.onnx", "--rank-ratio", "0.5", "--no-gate", "--report",
                        tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert "subnormal values flushed to zero" in result.stdout
    written = onnx.load(tmp_path / "out.onnx")
    assert model_subnormals(written) == 0  # the conv's dead weight is replaced by factors with none
