"""Inputs onnxruntime rejects are bad input (exit 2, one line naming the input); report file modes;
top-1 agreement only for score outputs; KV-cache MatMuls read as computed at run time (issue 15)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
from graphs import init, make_model, onnxlr_cli, tensor_input
from onnx import TensorProto, helper

import onnxlr
from onnxlr.verification import runtime
from onnxlr.verification import verify as v

RNG = np.random.default_rng(15)
VOCAB, POSITIONS, WIDTH = 100, 16, 64


def position_model(path):
    """ids [batch, seq] -> Gather(vocabulary) + position table [16, 64] -> MatMul: seq must be 16, ids < 100."""
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="emb"),
             helper.make_node("Add", ["e", "pos"], ["h"], name="addpos"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("input_ids", ["batch", "seq"], TensorProto.INT64)],
                       [tensor_input("y", None)],
                       [init("table", RNG.standard_normal((VOCAB, WIDTH)).astype(np.float32)),
                        init("pos", RNG.standard_normal((POSITIONS, WIDTH)).astype(np.float32)),
                        init("W", RNG.standard_normal((WIDTH, WIDTH)).astype(np.float32))])
    onnx.save(model, path)
    return path


@pytest.fixture
def files(tmp_path):
    model = position_model(tmp_path / "pos.onnx")
    np.savez(tmp_path / "short.npz", input_ids=np.zeros((2, 10), np.int64))
    np.savez(tmp_path / "oov.npz", input_ids=np.full((2, POSITIONS), 500, np.int64))
    return tmp_path, model


def assert_input_error(result, shape):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert f"input 'input_ids' fed as {shape}" in lines[0]
    assert "--shape input_ids:DIMS" in lines[0] or "--calibration" in lines[0]


CASES = [("short.npz", "2x10"), ("oov.npz", "2x16")]


@pytest.mark.parametrize("data,shape", CASES)
def test_bench_rejected_inputs_are_bad_input(files, data, shape):
    folder, model = files
    result = onnxlr_cli("bench", model, "--inputs", folder / data, "--samples", 2, "--runs", 2, "--warmup", 0)
    assert_input_error(result, shape)
    assert "--inputs FILE.npz" in result.stderr


def test_bench_synthesized_shape_past_the_position_table(files):
    _, model = files
    result = onnxlr_cli("bench", model, "--shape", "input_ids:2x1000", "--runs", 2)
    assert_input_error(result, "2x1000")
    assert "16 by 1000" in result.stderr  # onnxruntime's reason is kept in full


@pytest.mark.parametrize("data,shape", CASES)
def test_verify_rejected_inputs_are_bad_input(files, data, shape):
    folder, model = files
    assert_input_error(onnxlr_cli("verify", model, model, "--inputs", folder / data), shape)


@pytest.mark.parametrize("data,shape", CASES)
def test_optimize_verification_rejected_inputs_are_bad_input(files, data, shape):
    folder, model = files
    result = onnxlr_cli("optimize", model, folder / "out.onnx", "--inputs", folder / data)
    assert_input_error(result, shape)
    assert not (folder / "out.onnx").exists()


@pytest.mark.parametrize("data,shape", CASES)
def test_calibration_rejected_inputs_are_bad_input(files, data, shape):
    folder, model = files
    result = onnxlr_cli("optimize", model, folder / "out.onnx", "--calibration", folder / data, "--no-verify")
    assert_input_error(result, shape)


def test_input_named_by_onnxruntime_and_long_messages_kept():
    feeds = {"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 4), np.float32)}
    error = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: b for "
                         "the following indices\n index: 1 Got: 4 Expected: 3\n Please fix either the inputs")
    message = str(runtime.input_error(error, feeds, "the model"))
    assert "input 'b' fed as 1x4" in message and "'a'" not in message and "Got: 4 Expected: 3" in message
    assert "\n" not in message
    long = RuntimeError("x" * 400 + " the useful part")
    message = str(runtime.input_error(long, feeds, "the model"))
    assert "the useful part" in message and "'a' 1x3" in message and "'b' 1x4" in message  # unknown: all inputs


# ----------------------------------------------------------------------------- report file modes


def test_report_files_have_the_mode_of_models(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("x", ["batch", WIDTH])], [tensor_input("y", ["batch", WIDTH])],
                       [init("W", RNG.standard_normal((WIDTH, WIDTH)).astype(np.float32))])
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    result = onnxlr_cli("optimize", tmp_path / "m.onnx", out, "--rank-ratio", "1", "--allow-no-gain", "--no-gate",
                        "--report", tmp_path / "r.json", "--markdown", tmp_path / "r.md", "--html", tmp_path / "r.html")
    assert result.returncode == 0, result.stderr
    result = onnxlr_cli("verify", tmp_path / "m.onnx", out, "--json", tmp_path / "v.json")
    assert result.returncode == 0, result.stderr
    result = onnxlr_cli("bench", out, "--runs", 2, "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    result = onnxlr_cli("analyze", out, "--json", tmp_path / "a.json", "--html", tmp_path / "a.html")
    assert result.returncode == 0, result.stderr
    mode = stat.S_IMODE(os.stat(out).st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    for name in ("r.json", "r.md", "r.html", "v.json", "b.json", "a.json", "a.html"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


# ----------------------------------------------------------------------------- top-1 agreement


def test_top1_only_for_score_outputs():
    rows = RNG.standard_normal((8, 32))
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    noisy = rows + 0.01
    assert "top1_agreement" in v.compare_arrays(rows, noisy, v.Gates(), name="logits")
    assert "top1_agreement" in v.compare_arrays(rows, noisy, v.Gates(), name="output")
    assert "top1_agreement" not in v.compare_arrays(rows, noisy, v.Gates(), name="sentence_embedding")
    assert "top1_agreement" not in v.compare_arrays(rows, noisy, v.Gates(), name="pooler_output")
    assert "top1_agreement" not in v.compare_arrays(unit, unit + 0.01, v.Gates(), name="output")  # unit rows
    probs = np.exp(rows) / np.exp(rows).sum(1, keepdims=True)
    assert "top1_agreement" in v.compare_arrays(probs, probs, v.Gates(), name="output")


def test_verify_json_has_top1_for_logits_not_for_embeddings(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="head"),
             helper.make_node("MatMul", ["x", "V"], ["embedding"], name="proj")]
    model = make_model(nodes, [tensor_input("x", ["batch", WIDTH])],
                       [tensor_input("logits", ["batch", 10]), tensor_input("embedding", ["batch", 32])],
                       [init("W", RNG.standard_normal((WIDTH, 10)).astype(np.float32)),
                        init("V", RNG.standard_normal((WIDTH, 32)).astype(np.float32))])
    onnx.save(model, tmp_path / "m.onnx")
    result = onnxlr_cli("verify", tmp_path / "m.onnx", tmp_path / "m.onnx", "--json", tmp_path / "v.json")
    assert result.returncode == 0, result.stderr
    outputs = json.loads((tmp_path / "v.json").read_text())["providers"]["cpu"]["outputs"]
    assert "top1_agreement" in outputs["logits"]
    assert "top1_agreement" not in outputs["embedding"]


# ----------------------------------------------------------------------------- KV cache


def kv_cache_model():
    """scores = q @ Transpose(present_key), present_key = Concat(past_key, k) is also a graph output."""
    nodes = [helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
             helper.make_node("Concat", ["past_key", "k"], ["present_key"], axis=1, name="concat"),
             helper.make_node("Transpose", ["present_key"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["x", "kt"], ["scores"], name="attn")]
    inputs = [tensor_input("x", [1, "seq", WIDTH]), tensor_input("past_key", [1, "past", WIDTH])]
    outputs = [tensor_input("scores", None), tensor_input("present_key", None)]
    return make_model(nodes, inputs, outputs, [init("Wk", RNG.standard_normal((WIDTH, WIDTH)).astype(np.float32))])


def test_kv_cache_matmul_reads_as_runtime_weight():
    from onnxlr.passes.weights import constant_weight

    model = onnx_ir_model(kv_cache_model())
    attn = next(node for node in model.graph if node.name == "attn")
    found = constant_weight(attn.inputs[1])
    assert found.code == "runtime_weight" and found.runtime
    _, report = onnxlr.optimize(kv_cache_model(), rank_ratio=1.0, allow_no_gain=True, verify=False)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["attn"]["reason_code"] == "runtime_weight"


def test_constant_graph_output_weight_keeps_graph_output():
    from onnxlr.passes.weights import constant_weight

    nodes = [helper.make_node("Transpose", ["V"], ["Vt"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["x", "Vt"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("x", [4, 8])], [tensor_input("y", [4, 8]), tensor_input("Vt", [8, 8])],
                       [init("V", RNG.standard_normal((8, 8)).astype(np.float32))])
    ir_model = onnx_ir_model(model)
    mm = next(node for node in ir_model.graph if node.name == "mm")
    assert constant_weight(mm.inputs[1]).code == "graph_output"


def onnx_ir_model(model):
    import onnx_ir as ir

    return ir.from_proto(model)


def test_embeddings_get_neighbour_agreement_scores_get_top1():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((40, 16))
    same = v.compare_arrays(embeddings, embeddings * 1.0001, v.Gates(), name="sentence_embedding")
    assert same["neighbour_agreement"] == 1.0 and "top1_agreement" not in same
    shuffled = v.compare_arrays(embeddings, rng.permutation(embeddings), v.Gates(), name="sentence_embedding")
    assert shuffled["neighbour_agreement"] < 0.5  # other rows: other neighbours
    noisy = embeddings + 0.3 * rng.standard_normal(embeddings.shape)
    assert 0.3 < v.compare_arrays(embeddings, noisy, v.Gates(), name="embedding")["neighbour_agreement"] < 1.0
    logits = v.compare_arrays(embeddings, embeddings, v.Gates(), name="logits")
    assert "top1_agreement" in logits and "neighbour_agreement" not in logits
    few = v.compare_arrays(embeddings[:5], embeddings[:5], v.Gates(), name="embedding")
    assert "neighbour_agreement" not in few  # 5 samples have no 5 neighbours each


def test_a_task_metric_gate_fails_what_it_bounds_and_replaces_the_default_gate():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((40, 16))
    noisy = embeddings + 0.3 * rng.standard_normal(embeddings.shape)
    measured = v.compare_arrays(embeddings, noisy, v.Gates(), name="embedding")["neighbour_agreement"]
    strict = v.Gates.chosen(min_metrics=[("neighbours", measured + 0.01)])
    assert not strict.default and strict.min_cosine is None
    failed = v.compare_arrays(embeddings, noisy, strict, name="embedding")
    assert not failed["passed"] and "--min-metric neighbours=" in failed["failure"]
    assert failed["gated"] == ["min_neighbours"]
    loose = v.compare_arrays(embeddings, noisy, v.Gates.chosen(min_metrics=[("neighbours", measured - 0.01)]),
                             name="embedding")
    assert loose["passed"]
    logits = v.compare_arrays(embeddings, noisy, strict, name="logits")  # no neighbours there: not gated by it
    assert logits["gated"] == []
    assert v.parse_min_metrics(["top1=0.95", "neighbours=0.8"]) == (("top1", 0.95), ("neighbours", 0.8))
    for bad in ("perplexity=0.9", "top1", "top1=high"):
        with pytest.raises(v.OnnxlrError, match="min_metric takes NAME=VALUE"):
            v.parse_min_metrics([bad])


def test_the_cli_gates_an_embedding_on_neighbour_agreement(tmp_path):
    """A 2-D float output named like an embedding, on 40 given samples: --min-metric neighbours above what the
    rewrite keeps fails the run (exit 1, nothing written); a bad gate is exit 2 before any work."""
    from graphs import init, make_model, onnxlr_cli, tensor_input
    from onnx import helper

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["sentence_embedding"], name="proj")],
                       [tensor_input("x", ["n", 32])], [tensor_input("sentence_embedding", ["n", 32])],
                       [init("W", weight)])
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    np.savez(tmp_path / "inputs.npz", x=rng.standard_normal((40, 32)).astype(np.float32))
    common = [str(source), str(tmp_path / "out.onnx"), "--rank-ratio", "0.25", "--inputs", str(tmp_path / "inputs.npz")]
    failed = onnxlr_cli("optimize", *common, "--min-metric", "neighbours=0.999")
    assert failed.returncode == 1 and "--min-metric neighbours=0.999" in failed.stdout + failed.stderr
    assert not (tmp_path / "out.onnx").exists()
    bad = onnxlr_cli("optimize", *common, "--min-metric", "recall=0.9")
    assert bad.returncode == 2 and "min-metric takes NAME=VALUE" in bad.stderr
