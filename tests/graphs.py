"""Small helpers for tests: build one-node ONNX models, run them with onnxruntime, compare; calibration-like inputs."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ONNXLR = [sys.executable, "-m", "onnxlr"]  # the CLI in a process of its own, as a user runs it
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx.helper would write the newest
ANISOTROPIC_WIDTH = 16  # the width of anisotropic()'s vectors (K in the calibration tests)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, value_info=()):
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    # Outputs declared without a shape get the inferred one (the checker wants a shape field).
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor_input(name, shape, elem_type=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def run(model, feeds):
    """Run on onnxruntime's CPU provider with graph optimizations off (compare the graphs as written)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_outputs_close(reference, candidate, rtol=1e-4, atol=1e-4):
    assert len(reference) == len(candidate)
    for ref, out in zip(reference, candidate):
        assert ref.shape == out.shape
        assert ref.dtype == out.dtype
        scale = max(1.0, float(np.abs(ref.astype(np.float64)).max()))
        np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=rtol, atol=atol * scale)


def op_types(model):
    return [node.op_type for node in model.graph.node]


def onnxlr_cli(*args, cwd=None, timeout=180):
    """Run `python -m onnxlr ARGS` and return the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run([*ONNXLR, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def anisotropic(count: int, seed: int) -> np.ndarray:
    """(count, K) vectors from one fixed correlated, shifted distribution (the seed picks the samples)."""
    K = ANISOTROPIC_WIDTH
    mixing_rng = np.random.default_rng(1234)
    scales = np.geomspace(10.0, 0.01, K)
    mixing = np.linalg.qr(mixing_rng.standard_normal((K, K)))[0] * scales[:, None]
    mean = mixing_rng.standard_normal(K) * 3.0
    z = np.random.default_rng(seed).standard_normal((count, K))
    return (z @ mixing + mean).astype(np.float32)


def output_error(model: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict) -> float:
    reference, = run(model, feeds)
    out, = run(candidate, feeds)
    return float(np.linalg.norm(out.astype(np.float64) - reference) / np.linalg.norm(reference))


def parse_text(text: str, **initializers: np.ndarray) -> ir.Model:
    """The onnx-ir model written in ONNX text; each keyword becomes the initializer of that name."""
    tensors = [ir.tensor(np.asarray(array), name=name) for name, array in initializers.items()]
    # A weight the text only uses (not declares) makes onnx-ir's deserializer warn before
    # from_onnx_text attaches it as an initializer: expected here, not worth a log line.
    logger = logging.getLogger("onnx_ir.serde")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return ir.from_onnx_text(text, initializers=tensors)
    finally:
        logger.setLevel(level)
