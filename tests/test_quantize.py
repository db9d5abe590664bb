"""--quantize: onnxruntime's quantizers after the rewrite, through the API and the CLI, measured on the model
that is written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, onnxlr_cli, run, tensor_input
from onnx import helper, numpy_helper

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import quantize

D_IN, HIDDEN, D_OUT = 64, 128, 32


def low_rank(rows, cols, rank, rng):
    """A weight whose spectrum decays fast (as trained weights do): rank `rank` plus a little noise."""
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(rank * rows)
            + 0.01 * rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


def mlp(constant_weights=False):
    """x -> MatMul -> Add -> Relu -> MatMul -> y; with constant_weights, the weights are Constant nodes (as Paddle
    and some TensorFlow exports write them), which onnxruntime's quantizer does not read."""
    rng = np.random.default_rng(0)
    w1, w2 = low_rank(D_IN, HIDDEN, 12, rng), low_rank(HIDDEN, D_OUT, 12, rng)
    b1 = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    weights = {"W1": w1, "b1": b1, "W2": w2}
    if constant_weights:
        nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))
                 for name, array in weights.items()] + nodes
        initializers = []
    else:
        initializers = [init(name, array) for name, array in weights.items()]
    return make_model(nodes, [tensor_input("x", ["n", D_IN])], [tensor_input("y", ["n", D_OUT])], initializers)


def batch(count, seed):
    return {"x": np.random.default_rng(seed).standard_normal((count, D_IN)).astype(np.float32)}


def default_session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("mode, ops, ratio", [("int8", {"MatMulInteger", "DynamicQuantizeLinear"}, 0.3),
                                              ("int8-static", {"QuantizeLinear", "DequantizeLinear"}, 0.3),
                                              ("fp16", {"Cast"}, 0.55)])
def test_each_mode_quantizes_the_rewritten_model(mode, ops, ratio):
    model = mlp()
    original = model.SerializeToString()
    calibration = [batch(32, seed) for seed in range(3)]
    result, report = onnxlr.optimize(model, calibration=calibration, param_budget=0.6, quantize=mode, verify=False)
    assert model.SerializeToString() == original  # the input is never modified
    onnx.checker.check_model(result, full_check=True)
    assert ops <= {node.op_type for node in result.graph.node}
    stage = report["quantization"]
    assert stage["mode"] == mode and stage["bytes_low_rank"] == report["totals"]["bytes_after"]
    assert stage["bytes_after"] <= ratio * stage["bytes_low_rank"]
    data = batch(64, 9)
    assert cosine(run(model, data)[0], run(result, data)[0]) > 0.98
    assert report["settings"]["quantize"] == mode


def test_constant_node_weights_are_lifted_so_the_quantizer_reads_them(tmp_path):
    """onnxruntime's quantize_dynamic leaves Constant-node weights in float; onnxlr lifts them to initializers."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = mlp(constant_weights=True)
    source = tmp_path / "constants.onnx"
    onnx.save(model, source)
    quantize_dynamic(source, tmp_path / "ort.onnx", per_channel=True, weight_type=QuantType.QInt8)
    assert "MatMulInteger" not in {node.op_type for node in onnx.load(tmp_path / "ort.onnx").graph.node}
    quantized = ir.to_proto(quantize.quantize(ir.load(source), "int8"))
    assert sum(node.op_type == "MatMulInteger" for node in quantized.graph.node) == 2
    data = batch(16, 3)
    assert cosine(run(model, data)[0], run(quantized, data)[0]) > 0.99


def test_static_needs_calibration_and_the_pass_says_it_is_a_stage():
    with pytest.raises(OnnxlrError, match="int8-static needs calibration"):
        onnxlr.optimize(mlp(), rank_ratio=0.5, quantize="int8-static", verify=False)
    with pytest.raises(OnnxlrError, match="quantize must be one of"):
        onnxlr.optimize(mlp(), rank_ratio=0.5, quantize="int3", verify=False)
    with pytest.raises(OnnxlrError, match="stage of onnxlr.optimize"):
        onnxlr.FactorizationPass(rank_ratio=0.5, quantize="int8")(ir.serde.deserialize_model(mlp()))


def test_target_search_pays_for_the_quantizer_and_checks_the_final_model():
    """--target-cosine with --quantize: the search aims past the goal by the quantizer's own loss (measured on
    the original), and the written, quantized model's held-out cosine is in the report."""
    model = mlp()
    calibration = [batch(32, seed) for seed in range(3)]
    heldout = [batch(16, seed) for seed in (20, 21, 22, 23)]  # the API's batch size: dynamic INT8 ranges are per batch
    result, report = onnxlr.optimize(model, calibration=calibration, heldout=heldout, target_cosine=0.995,
                                     quantize="int8", verify=False)
    quantizer = report["calibration"]["quantizer"]
    assert quantizer["mode"] == "int8" and 0.995 < quantizer["cosine_alone"] < 1.0
    assert quantizer["low_rank_goal"] == pytest.approx(1 - (quantizer["cosine_alone"] - 0.995))
    final = report["quantization"]["final"]
    # Measured as deployed: onnxruntime with its graph optimizations.
    reference = np.concatenate([default_session(model).run(None, b)[0] for b in heldout])
    written = np.concatenate([default_session(result).run(None, b)[0] for b in heldout])
    assert final["cosine"] == pytest.approx(cosine(reference, written), abs=1e-6)
    assert final["met"] == (final["cosine"] >= 0.995)


def test_a_goal_the_quantizer_alone_misses_is_an_error():
    calibration = [batch(32, seed) for seed in range(2)]
    with pytest.raises(OnnxlrError, match="alone already gives"):
        onnxlr.optimize(mlp(), calibration=calibration, heldout=[batch(16, 5)], target_cosine=1.0, quantize="int8", verify=False)


def test_cli_writes_the_quantized_model_verified(tmp_path):
    source, out, report_path = tmp_path / "mlp.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(mlp(), source)
    np.savez(tmp_path / "calib.npz", **batch(64, 1))
    args = ["--calibration", tmp_path / "calib.npz", "--inputs", tmp_path / "calib.npz", "--param-budget", "0.6",
            "--quantize", "int8", "--report", report_path]
    strict = onnxlr_cli("optimize", source, out, *args, "--min-cosine", "0.9999")
    assert strict.returncode == 1 and "verification failed" in strict.stderr and not out.exists()  # the final model
    assert json.loads(report_path.read_text())["quantization"]["mode"] == "int8"
    result = onnxlr_cli("optimize", source, out, *args, "--min-cosine", "0.95")
    assert result.returncode == 0, result.stderr
    assert "quantized (int8)" in result.stdout and "pre-processing" not in result.stderr
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] and report["quantization"]["mode"] == "int8"
    assert "MatMulInteger" in {node.op_type for node in onnx.load(out).graph.node}
    assert out.stat().st_size < 0.4 * source.stat().st_size
    bad = onnxlr_cli("optimize", source, tmp_path / "bad.onnx", "--quantize", "int3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "bad.onnx").exists()


def test_bench_compare_and_the_html_report_show_the_quantized_size(tmp_path):
    source, out, report_path = tmp_path / "mlp.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(mlp(), source)
    model, report = onnxlr.optimize(mlp(), rank_ratio=0.5, quantize="int8", verify=False)
    onnx.save(model, out)
    from onnxlr.render.html_report import render_html

    page = render_html(report)
    assert "bytes after --quantize int8" in page and "bytes kept, int8" in page
    result = onnxlr_cli("bench", source, "--compare", out, "--runs", "3", "--json", report_path)
    assert result.returncode == 0, result.stderr
    files = json.loads(report_path.read_text())["files"]
    assert [f["bytes"] for f in files] == [source.stat().st_size, out.stat().st_size]
    assert f"({out.stat().st_size / source.stat().st_size:.3f}x)" in result.stdout


def test_a_written_model_that_misses_the_goal_is_searched_again(monkeypatch, caplog):
    """When the quantized low-rank model loses more than the quantizer's loss on the original predicted (here:
    the first quantized candidate gets its weights perturbed, as a kernel that saturates would), the search
    runs again from the original with a stricter low-rank goal, and the written model meets the goal."""
    real = quantize.quantize_saved
    calls = {"candidates": 0}

    def lossy_once(source, mode, calibration=None, block=32, symmetric=True):
        result = real(source, mode, calibration, block, symmetric)
        factored = any(name.endswith("_lr_b_scale") for name in result.graph.initializers)
        if factored:
            calls["candidates"] += 1
            if calls["candidates"] == 1:
                for value in result.graph.initializers.values():
                    if value.name.endswith("_lr_b_scale"):  # the second factors' dequantization scales
                        scales = value.const_value.numpy()
                        noise = 1 + 0.3 * np.random.default_rng(0).standard_normal(scales.shape)
                        value.const_value = ir.tensor((scales * noise).astype(scales.dtype))
        return result

    monkeypatch.setattr(quantize, "quantize_saved", lossy_once)
    calibration = [batch(32, seed) for seed in range(3)]
    heldout = [batch(16, seed) for seed in (20, 21, 22, 23)]
    with caplog.at_level("WARNING"):
        result, report = onnxlr.optimize(mlp(), calibration=calibration, heldout=heldout, target_cosine=0.995,
                                         quantize="int8", verify=False)
    stage, quantizer = report["quantization"], report["calibration"]["quantizer"]
    assert stage["attempts"] == 2 and stage["final"]["met"]
    assert quantizer["extra_loss"] > 0 and quantizer["low_rank_goal"] > 1 - (quantizer["cosine_alone"] - 0.995)
    assert "searching again with a stricter low-rank goal" in caplog.text


def test_static_int8_keeps_a_transformers_normalization_and_softmax_float():
    """MiniLM with every op in static QDQ kept a cosine of 0.354 to the float embeddings; with only its weighted
    MatMuls in QDQ (normalization, softmax and the attention products float) it keeps 0.93."""
    import models

    folder = models.build("minilm")
    written, _ = onnxlr.optimize(str(folder / "model.onnx"), quantize="int8-static", min_params=1 << 40,
                                 calibration=str(folder / "calib.npz"), verify=False)
    quantized = ir.to_proto(written)
    readers = {}
    for node in quantized.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    dequantized_into = {op for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                        for op in readers.get(n.output[0], [])}
    assert "MatMul" in dequantized_into and not dequantized_into & {"LayerNormalization", "Softmax", "Erf"}
    quantized_matmuls = {n.name for n in quantized.graph.node if n.op_type == "MatMul"
                         and any(name.endswith("DequantizeLinear_Output") or "_dequantized" in name for name in n.input)}
    assert quantized_matmuls and all("attention/self/MatMul" not in name for name in quantized_matmuls)
    held_out = {k: v[:64] for k, v in np.load(folder / "eval.npz").items() if k in ("input_ids", "attention_mask")}
    reference = default_session(onnx.load(folder / "model.onnx")).run(None, held_out)[0]
    assert cosine(reference, default_session(quantized).run(None, held_out)[0]) > 0.9


def test_static_int8_on_a_model_without_normalization_quantizes_every_op_it_can():
    quantized, _ = onnxlr.optimize(mlp(), quantize="int8-static", min_params=1 << 40, calibration=[batch(32, 1)],
                                   verify=False)
    dequantized = {n.input[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert "b1_quantized" in dequantized  # the Add between the MatMuls is in QDQ too (the CNN-style path)
    assert not any(n.op_type == "Relu" for n in quantized.graph.node)  # folded into the quantized range
