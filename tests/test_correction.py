"""--quantize int4 and the low-rank correction of 4-bit error (onnxlr.factorize.correction): onnxruntime runs what is
written, compared with the float original on inputs calibration never saw."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import init, make_model, tensor_input
from onnx import helper

import onnxlr
from onnxlr.errors import OnnxlrError

D_IN, HIDDEN, D_OUT = 64, 96, 48
NOT_FACTORIZED = {"min_params": 1 << 40}  # every layer kept dense by selection: the quantizer (and correction) alone


def mlp() -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul -> y, with dense weights (4-bit loses visibly on them)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((D_IN, HIDDEN)) / np.sqrt(D_IN)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, D_OUT)) / np.sqrt(HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [tensor_input("x", ["n", D_IN])], [tensor_input("y", ["n", D_OUT])],
                      [init("W1", w1), init("W2", w2)])


def inputs(count: int, seed: int) -> dict[str, np.ndarray]:
    """Anisotropic inputs (a few directions carry most of the energy), as real activations are."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(4.0, 0.05, D_IN)
    return {"x": (rng.standard_normal((count, D_IN)) * scales).astype(np.float32)}


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))


def int4(model: onnx.ModelProto, **settings) -> tuple[onnx.ModelProto, dict]:
    return onnxlr.optimize(model, quantize="int4", calibration=[inputs(64, 1), inputs(64, 2)], verify=False,
                           **NOT_FACTORIZED, **settings)


def test_int4_writes_matmulnbits_and_is_smaller():
    model = mlp()
    quantized, report = onnxlr.optimize(model, quantize="int4", verify=False, **NOT_FACTORIZED)
    assert {n.op_type for n in quantized.graph.node} == {"MatMulNBits", "Relu"}
    assert report["quantization"]["bytes_after"] < 0.2 * report["quantization"]["bytes_low_rank"]
    held_out = inputs(32, 9)
    error = relative_error(outputs(model, held_out), outputs(quantized, held_out))
    assert 1e-3 < error < 0.2  # 4 bits lose something, not everything


def test_rank_zero_adds_nothing_and_full_rank_float32_restores_the_weights():
    model, held_out = mlp(), inputs(32, 9)
    plain, _ = onnxlr.optimize(model, quantize="int4", verify=False, **NOT_FACTORIZED)
    none, report = int4(model, correction_rank=0)
    assert none.SerializeToString() == plain.SerializeToString()
    assert "correction" not in report["quantization"]
    with pytest.raises(OnnxlrError, match="more than the input's .* give a smaller correction_rank"):
        int4(model, correction_rank=max(D_IN, HIDDEN), correction_dtype="float32")
    exact, report = int4(model, correction_rank=max(D_IN, HIDDEN), correction_dtype="float32", allow_no_gain=True)
    reference = outputs(model, held_out)
    assert relative_error(reference, outputs(exact, held_out)) < 1e-5
    assert report["quantization"]["correction"]["layers"] == 2
    assert [n.op_type for n in exact.graph.node].count("MatMulNBits") == 2  # the 4-bit nodes stay: a path is added


def test_the_error_falls_with_the_rank_and_int8_factors_cost_a_quarter():
    model, held_out = mlp(), inputs(256, 9)
    reference = outputs(model, held_out)
    errors = []
    for rank in (0, 4, 16, 32):
        corrected, _ = int4(model, correction_rank=rank)
        errors.append(relative_error(reference, outputs(corrected, held_out)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0], errors
    half, half_report = int4(model, correction_rank=16, correction_dtype="float16")
    small, small_report = int4(model, correction_rank=16, correction_dtype="int8")
    bytes_half, bytes_int8 = (r["quantization"]["correction"]["bytes"] for r in (half_report, small_report))
    assert bytes_int8 < 0.6 * bytes_half
    assert "DequantizeLinear" in {n.op_type for n in small.graph.node}
    assert relative_error(reference, outputs(small, held_out)) < 1.1 * relative_error(reference,
                                                                                     outputs(half, held_out))


def test_correction_needs_int4_and_calibration():
    with pytest.raises(OnnxlrError, match="correction_rank corrects 4-bit quantization error"):
        onnxlr.optimize(mlp(), quantize="int8", correction_rank=8, verify=False)
    with pytest.raises(OnnxlrError, match="correction_rank needs calibration data"):
        onnxlr.optimize(mlp(), quantize="int4", correction_rank=8, verify=False, **NOT_FACTORIZED)


def test_int4_quantizes_an_embedding_table_at_opset_21():
    """A table below opset 21 is converted first (int4 tensors need it) and stored 4-bit (GatherBlockQuantized)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((256, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("ReduceSum", ["e"], ["y"], axes=[1], keepdims=0)]  # an opset-13 attribute
    model = make_model(nodes, [tensor_input("ids", ["n", 8], onnx.TensorProto.INT64)],
                       [tensor_input("y", ["n", 64])], [init("E", table)], opset=11)
    quantized, _ = onnxlr.optimize(model, quantize="int4", ops=("Gather",), verify=False, **NOT_FACTORIZED)
    assert "GatherBlockQuantized" in {n.op_type for n in quantized.graph.node}
    assert next(o.version for o in quantized.opset_import if o.domain == "") == 21
    feeds = {"ids": rng.integers(0, 256, (4, 8)).astype(np.int64)}
    assert relative_error(outputs(model, feeds), outputs(quantized, feeds)) < 0.1


def test_a_larger_int4_block_stores_fewer_scales():
    weight = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [tensor_input("x", ["n", 256])],
                       [tensor_input("y", ["n", 128])], [init("W", weight)])
    sizes = {}
    for block in (32, 64):
        _, report = onnxlr.optimize(model, quantize="int4", quantize_block=block, verify=False, **NOT_FACTORIZED)
        assert report["quantization"]["block"] == block
        sizes[block] = report["quantization"]["bytes_after"]
    assert sizes[64] < sizes[32]
    with pytest.raises(OnnxlrError, match="quantize_block must be one of 16, 32, 64, 128, 256, got 48"):
        onnxlr.optimize(model, quantize="int4", quantize_block=48, verify=False)


def test_allocate_takes_each_layers_directions_in_order_within_the_budget():
    from onnxlr.factorize.correction import allocate

    worth = [np.array([9.0, 1.0, 0.5]), np.array([4.0, 3.0, 2.0, 1.0])]
    # Per parameter: layer 0's directions are worth 3.0, 0.33, 0.17 (width 3); layer 1's 2.0, 1.5, 1.0, 0.5 (width 2).
    assert allocate(worth, [3, 2], budget=3 + 2 + 2 + 2) == [1, 3]
    assert allocate(worth, [3, 2], budget=100) == [3, 4]
    assert allocate(worth, [3, 2], budget=2) == [0, 1]  # the first direction of layer 0 does not fit
    assert allocate(worth, [3, 0], budget=100) == [3, 0]  # a layer with no width is never corrected


def test_measured_allocation_spends_the_bytes_where_the_outputs_move():
    """Two branches, one scaled by 0.01 before the output: its 4-bit error barely moves the outputs. Fed alone, each
    layer's quantized weight shows that, and the uniform rank's bytes go to the branch that matters."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="loud"),
             helper.make_node("MatMul", ["x", "W2"], ["b"], name="quiet"),
             helper.make_node("Mul", ["b", "scale"], ["c"]), helper.make_node("Add", ["a", "c"], ["y"])]
    weights = [init(name, (rng.standard_normal((D_IN, D_OUT)) / np.sqrt(D_IN)).astype(np.float32))
               for name in ("W1", "W2")]
    model = make_model(nodes, [tensor_input("x", ["n", D_IN])], [tensor_input("y", ["n", D_OUT])],
                       [*weights, init("scale", np.array(0.01, dtype=np.float32))])
    held_out = inputs(256, 9)
    reference = outputs(model, held_out)
    uniform, uniform_report = int4(model, correction_rank=8, correction_dtype="float32")
    shared, shared_report = int4(model, correction_rank=8, correction_dtype="float32", correction_allocation="measured")
    correction = shared_report["quantization"]["correction"]
    assert correction["allocation"] == "measured" and correction["ranks"][0] == 16  # all to the loud branch
    assert correction["bytes"] <= uniform_report["quantization"]["correction"]["bytes"]
    assert relative_error(reference, outputs(shared, held_out)) < 0.9 * relative_error(reference,
                                                                                       outputs(uniform, held_out))


def test_the_stored_weight_is_read_back_a_slice_of_the_identity_at_a_time(monkeypatch):
    """Q(W) comes from onnxruntime running the quantized node on the identity, in slices (a wide layer's whole
    identity would not fit): slices of 24 rows (K = 64 and 96) give the same exact full-rank restoration."""
    from onnxlr.factorize import correction

    monkeypatch.setattr(correction, "IDENTITY_ROWS", 24)
    model, held_out = mlp(), inputs(32, 9)
    exact, _ = int4(model, correction_rank=max(D_IN, HIDDEN), correction_dtype="float32", allow_no_gain=True)
    assert relative_error(outputs(model, held_out), outputs(exact, held_out)) < 1e-5


def test_asymmetric_int4_stores_a_zero_point_per_block_and_loses_less():
    model, held_out = mlp(), inputs(256, 9)
    reference = outputs(model, held_out)
    symmetric, _ = onnxlr.optimize(model, quantize="int4", verify=False, **NOT_FACTORIZED)
    asymmetric, report = onnxlr.optimize(model, quantize="int4", quantize_symmetric=False, verify=False,
                                         **NOT_FACTORIZED)
    assert report["quantization"]["symmetric"] is False
    nodes = [n for n in asymmetric.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(len(n.input) >= 4 and n.input[3] for n in nodes)  # zero points given
    assert all(len(n.input) < 4 or not n.input[3] for n in symmetric.graph.node if n.op_type == "MatMulNBits")
    assert (relative_error(reference, outputs(asymmetric, held_out))
            < relative_error(reference, outputs(symmetric, held_out)))
