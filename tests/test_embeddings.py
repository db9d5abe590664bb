"""Embedding tables (`--ops ...,Gather`): Gather(E, ids) becomes MatMul(Gather(A, ids), B), exact at full rank,
its rank chosen by the same policies and budgets, and with calibration data fitted to the ids that occur."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import init, make_model, onnxlr_cli, run, tensor_input
from onnx import TensorProto, helper

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank

VOCAB, WIDTH = 300, 24


def embedding_model(mask=False):
    """ids -> Gather(E) -> MatMul(W) -> y, with a shape Gather and a 1-D table lookup beside it (not tables)."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((VOCAB, 6)) @ rng.standard_normal((6, WIDTH))
             + 0.3 * rng.standard_normal((VOCAB, WIDTH))).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="head"),
             helper.make_node("Gather", ["bias_table", "ids"], ["b"], name="bias_lookup"),  # 1-D: not a table
             helper.make_node("Unsqueeze", ["b", "last"], ["b3"]),
             helper.make_node("Add", ["h", "b3"], ["y"]),
             helper.make_node("Shape", ["ids"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], name="shape_lookup", axis=0)]
    inputs = [tensor_input("ids", ["b", "s"], TensorProto.INT64)]
    if mask:
        inputs.append(tensor_input("attention_mask", ["b", "s"], TensorProto.INT64))
        nodes.append(helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask3"]))
        nodes[4] = helper.make_node("Add", ["h", "b3"], ["y0"])
        nodes.append(helper.make_node("Mul", ["y0", "mask3"], ["y"]))
    weights = [init("E", table), init("W", rng.standard_normal((WIDTH, 8)).astype(np.float32)),
               init("bias_table", rng.standard_normal(VOCAB).astype(np.float32)),
               init("last", np.array([-1], np.int64)), init("zero", np.array(0, np.int64))]
    return make_model(nodes, inputs, [tensor_input("y", None), tensor_input("batch", None, TensorProto.INT64)],
                      weights)


def ids(count, seed, mask=False):
    """Zipf-distributed ids: a few are frequent, most rare (as words are)."""
    rng = np.random.default_rng(seed)
    batch = {"ids": np.minimum(rng.zipf(1.3, (count, 10)) - 1, VOCAB - 1).astype(np.int64)}
    if mask:
        batch["attention_mask"] = np.ones((count, 10), np.int64)
        batch["attention_mask"][:, 7:] = 0
        batch["ids"][:, 7:] = VOCAB - 1  # padding: a rare id, many times
    return batch


def cosine(model, candidate, feeds):
    a, b = run(model, feeds)[0].ravel(), run(candidate, feeds)[0].ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_tables_are_opt_in_and_only_tables_are_candidates():
    model = embedding_model()
    _, default = onnxlr.optimize(model, rank_ratio=0.25, verify=False)
    assert [row["name"] for row in default["layers"]] == ["head"]  # the default leaves tables alone
    result, report = onnxlr.optimize(model, rank_ratio=0.25, ops=("MatMul", "Gather"), verify=False)
    rows = {row["name"]: row for row in report["layers"]}
    assert set(rows) == {"embed", "head"}  # the 1-D lookup and the shape Gather are not candidates
    assert rows["embed"]["status"] == "factorized" and rows["embed"]["rank"] == 6
    assert rows["embed"]["params_after"] == 6 * (VOCAB + WIDTH) < rows["embed"]["params_before"]
    ops = [node.op_type for node in result.graph.node]
    assert ops.count("Gather") == 3 and ops.count("MatMul") == 3  # Gather(A) -> MatMul(B), and the head's pair
    onnx.checker.check_model(result, full_check=True)


def test_full_rank_is_exact():
    model = embedding_model()
    result, _ = onnxlr.optimize(model, rank_ratio=1.0, allow_no_gain=True, ops=("Gather",), verify=False)
    feeds = ids(5, 3)
    for ref, out in zip(run(model, feeds), run(result, feeds)):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_calibration_weights_the_rows_by_how_often_their_ids_occur():
    model = embedding_model()
    calibration = [ids(32, seed) for seed in range(4)]
    heldout = ids(200, 50)
    plain, plain_report = onnxlr.optimize(model, rank=4, ops=("Gather",), verify=False)
    weighted, report = onnxlr.optimize(model, rank=4, ops=("Gather",), calibration=calibration, verify=False)
    assert {r["name"]: r["method"] for r in report["layers"]}["embed"] == "frequency"
    assert cosine(model, weighted, heldout) > cosine(model, plain, heldout)


def test_padding_is_not_counted_and_budgets_allocate_tables_too():
    model = embedding_model(mask=True)
    calibration = [ids(32, seed, mask=True) for seed in range(3)]
    from onnxlr.calibrate import datafit

    result, report = onnxlr.optimize(model, calibration=calibration, param_budget=0.5, ops=("MatMul", "Gather"), verify=False)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["embed"]["status"] == "factorized" and rows["embed"]["method"] == "frequency"
    total_before = sum(r["params_before"] for r in rows.values())
    assert sum(r["params_after"] for r in rows.values()) <= 0.5 * total_before + 1
    weights = datafit.row_weights(_group_of(model), calibration)
    assert weights[VOCAB - 1] == 1.0 + sum(int((b["ids"][b["attention_mask"] != 0] == VOCAB - 1).sum())
                                           for b in calibration)


def _group_of(model):
    import onnx_ir as ir
    from onnxlr.passes import Context

    from onnxlr.factorize.targets import find_targets
    from onnxlr.settings import Settings

    found = find_targets(ir.serde.deserialize_model(model), Settings.of(ops=("Gather",)), Context(shapes={}, opset=17))
    return next(g for g in found.groups if g.lead.node.name == "embed")


def test_row_weighted_svd_minimizes_the_weighted_error():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((1, 40, 12))
    weights = rng.integers(1, 50, 40).astype(np.float64)
    weighted = lowrank.row_weighted_svd(matrix, weights)
    plain = lowrank.svd(matrix)

    def weighted_error(decomposition):
        a, b = decomposition.factors(4)
        return float(np.sum(weights[:, None] * (matrix[0] - (a @ b)[0]) ** 2))

    assert weighted_error(weighted) < weighted_error(plain)
    ones = lowrank.row_weighted_svd(matrix, np.ones(40))
    np.testing.assert_allclose(np.abs(ones.s), np.abs(plain.s), rtol=1e-10)
    with pytest.raises(ValueError):
        lowrank.row_weighted_svd(matrix, np.zeros(40))


def test_cli_accepts_gather_and_names_it_when_ops_are_wrong(tmp_path):
    source = tmp_path / "embed.onnx"
    onnx.save(embedding_model(), source)
    result = onnxlr_cli("optimize", source, tmp_path / "out.onnx", "--ops", "MatMul,Gather", "--rank-ratio", "0.5",
                        "--no-gate")
    assert result.returncode == 0, result.stderr
    bad = onnxlr_cli("optimize", source, tmp_path / "bad.onnx", "--ops", "Embedding")
    assert bad.returncode == 2 and "Gather" in bad.stderr
    with pytest.raises(OnnxlrError, match="Gather"):
        onnxlr.optimize(embedding_model(), ops=("Lookup",), verify=False)


def test_analyze_covers_tables_when_asked(tmp_path):
    source = tmp_path / "embed.onnx"
    onnx.save(embedding_model(), source)
    from onnxlr.analyze import analyze_model
    from onnxlr.model_io.io import load

    result = analyze_model(load(source).model, model_path=str(source), ops=("MatMul", "Gather"))
    assert {layer["name"] for layer in result["layers"]} == {"embed", "head"}
    assert "--ops MatMul,Gather" in result["recommendation"]["command"]
    assert {layer["name"] for layer in analyze_model(load(source).model)["layers"]} == {"head"}
