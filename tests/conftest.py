"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import init, make_model, tensor_input
from model_files import matmul_model, save_external
from onnx import helper


@pytest.fixture()
def small_model(tmp_path) -> Path:
    """img -> Conv -> Relu -> Flatten -> Gemm -> logits: one layer of each kind that optimize factorizes."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["img", "K", "kb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["logits"], name="head", transB=1)]
    inits = [init("K", rng.standard_normal((32, 16, 3, 3)).astype(np.float32)),
             init("kb", rng.standard_normal(32).astype(np.float32)),
             init("W", rng.standard_normal((10, 32 * 6 * 6)).astype(np.float32)),
             init("b", rng.standard_normal(10).astype(np.float32))]
    model = make_model(nodes, [tensor_input("img", ["batch", 16, 6, 6])], [tensor_input("logits", ["batch", 10])],
                       inits)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture
def ext_model(tmp_path: Path) -> Path:
    """tmp_path/in/model.onnx with its 64x64 weight in tmp_path/in/w.data (model_files.matmul_model)."""
    return save_external(matmul_model(), tmp_path / "in" / "model.onnx")
