"""onnxlr.model_io.io: loading every supported kind and refusing hostile files before reading them.

Every refusal test checks three things: the error names the problem, nothing is written, and the
input files are byte-for-byte unchanged (a hash snapshot of the whole tmp_path tree). Saving:
test_save.py. The models and the hostile setups: model_files.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import onnxruntime as ort
import pytest
from model_files import (
    HOSTILE,
    NOT_A_MODEL,
    N,
    assert_refused,
    external_locations,
    matmul_model,
    onnxlr_command,
    snapshot,
)
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr.model_io import io
from onnxlr.model_io.save import save

# ----------------------------------------------------------------------------- hostile external data


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_external_data_is_refused_before_anything_is_written(tmp_path, ext_model, case):
    setup, message = HOSTILE[case]
    setup(tmp_path, ext_model)
    assert_refused(tmp_path, ext_model, tmp_path / "out" / "o.onnx", match=message)
    assert not (tmp_path / "out").exists()
    # The message names the model and the tensor, so the user knows where to look.
    with pytest.raises(OnnxlrError, match=r"model\.onnx: tensor 'W'|model\.onnx: external data file"):
        io.load(ext_model)


def _function_model(tmp_path: Path, location: str) -> Path:
    """in/model.onnx whose output is a Constant inside a model-local function, stored at `location`."""
    tensor = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[16],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    function = helper.make_function("custom", "Leak", [], ["y"], [helper.make_node("Constant", [], ["y"], value=tensor)],
                                    opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Leak", [], ["y"], domain="custom")], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])])
    model = helper.make_model(graph, ir_version=10, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_in_a_function_body_is_checked_too(tmp_path):
    """A Constant inside a model-local function may not read a file outside the model's folder."""
    np.arange(16, dtype=np.float32).tofile(tmp_path / "secret.bin")
    path = _function_model(tmp_path, "../secret.bin")
    assert_refused(tmp_path, path, tmp_path / "out" / "o.onnx", match="tensor 'c'.*leaves the model's folder")
    assert not (tmp_path / "out").exists()


def test_external_data_in_a_function_body_is_read_from_the_models_folder(tmp_path, monkeypatch):
    path = _function_model(tmp_path, "c.bin")
    values = np.arange(16, dtype=np.float32)
    values.tofile(path.parent / "c.bin")
    monkeypatch.chdir(tmp_path)  # not the model's folder: the tensor must not be read relative to it
    loaded = io.load("in/model.onnx")
    assert loaded.external_files == ((path.parent / "c.bin").resolve(),)
    out = tmp_path / "out" / "o.onnx"
    save(loaded.model, out, source=loaded)
    assert external_locations(out) <= {"o.onnx.data"}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {})[0], values)


# ----------------------------------------------------------------------------- not a model


@pytest.mark.parametrize("case", list(NOT_A_MODEL))
def test_not_a_model_is_refused(tmp_path, case):
    make, message = NOT_A_MODEL[case]
    if case == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "in.onnx"
    if make is not None:
        make(path)
    assert_refused(tmp_path, path, tmp_path / "out" / "o.onnx", match=message)
    assert not (tmp_path / "out").exists()


def test_unsupported_source_type_is_refused():
    with pytest.raises(OnnxlrError, match="cannot load a model from a bytes"):
        io.load(matmul_model().SerializeToString())


def test_proto_with_external_data_but_no_folder_is_refused(ext_model):
    proto = onnx.load(str(ext_model), load_external_data=False)
    with pytest.raises(OnnxlrError, match="references external data but has no folder"):
        io.load(proto)


# ----------------------------------------------------------------------------- load kinds


def _mutate(model: ir.Model) -> None:
    """Change the loaded model the way a rewrite would: rename a node, replace a weight."""
    model.graph.node(0).name = "changed"
    model.graph.initializers["W"].const_value = ir.tensor(np.zeros((N, N), np.float32), name="W")


def test_load_path(ext_model):
    loaded = io.load(str(ext_model))
    assert loaded.kind == "path" and loaded.path == ext_model
    assert io.convert(loaded.model, loaded.kind) is loaded.model


def test_load_proto_leaves_the_callers_proto_alone():
    proto = matmul_model()
    before = proto.SerializeToString()
    loaded = io.load(proto)
    assert loaded.kind == "proto" and not loaded.uses_external_data
    _mutate(loaded.model)
    result = io.convert(loaded.model, loaded.kind)
    assert isinstance(result, onnx.ModelProto) and result is not proto
    assert result.graph.node[0].name == "changed"
    np.testing.assert_array_equal(numpy_helper.to_array(result.graph.initializer[0]), 0)
    assert proto.SerializeToString() == before


def test_load_ir_model_leaves_the_callers_model_alone():
    model = ir.serde.deserialize_model(matmul_model())
    before = ir.serde.serialize_model(model).SerializeToString()
    loaded = io.load(model)
    assert loaded.kind == "ir" and loaded.model is not model
    _mutate(loaded.model)
    result = io.convert(loaded.model, loaded.kind)
    assert isinstance(result, ir.Model) and result is not model
    assert result.graph.node(0).name == "changed"
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_load_graphsurgeon_graph_leaves_the_callers_graph_alone():
    graph = gs.import_onnx(matmul_model())
    before = gs.export_onnx(graph).SerializeToString()
    loaded = io.load(graph)
    assert loaded.kind == "graphsurgeon"
    _mutate(loaded.model)
    result = io.convert(loaded.model, loaded.kind)
    assert isinstance(result, gs.Graph) and result is not graph
    assert result.nodes[0].name == "changed"
    np.testing.assert_array_equal(result.tensors()["W"].values, 0)
    assert gs.export_onnx(graph).SerializeToString() == before


def test_convert_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown model kind"):
        io.convert(ir.serde.deserialize_model(matmul_model()), "pickle")


# ----------------------------------------------------------------------------- the CLI, end to end


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*onnxlr_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["dotdot", "output-is-input"])
def test_cli_refuses_with_a_short_message(tmp_path, ext_model, case):
    if case == "dotdot":
        HOSTILE["dotdot"][0](tmp_path, ext_model)
        output, message = "out/o.onnx", "leaves the model's folder"
    else:
        output, message = "in/../in/model.onnx", "the output is the input model"
    before = snapshot(tmp_path)
    result = _cli(["optimize", "in/model.onnx", output, "--rank-ratio", "0.25"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, result.stderr
    assert lines[0].startswith("onnxlr: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before
