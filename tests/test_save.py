"""onnxlr.model_io.save: atomic saves, with or without external data, and the output paths it refuses.

Every refusal test checks three things: the error names the problem, nothing is written, and the
input files are byte-for-byte unchanged (a hash snapshot of the whole tmp_path tree). Loading:
test_io.py. The models: model_files.py.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from model_files import (
    WEIGHT,
    N,
    X,
    assert_refused,
    external_locations,
    matmul_model,
    onnxlr_command,
    optimize_in_process,
    save_external,
    snapshot,
)
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr.model_io import io
from onnxlr.model_io.save import save

# The module, for monkeypatching its globals: `onnxlr.model_io.save` is the function (the package exports it).
save_module = importlib.import_module("onnxlr.model_io.save")


def run_ort(model: Path | bytes) -> np.ndarray:
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


def expected_output() -> np.ndarray:
    """What onnxruntime computes for the original model (numpy's x @ W rounds differently)."""
    return run_ort(matmul_model().SerializeToString())


# ----------------------------------------------------------------------------- output path checks


def test_output_equal_to_input_is_refused(tmp_path, ext_model):
    assert_refused(tmp_path, ext_model, ext_model, match="the output is the input model")


def test_output_equal_to_input_spelled_differently_is_refused(tmp_path, ext_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(tmp_path, "in/model.onnx", "./in/../in/model.onnx", match="the output is the input model")
    assert_refused(tmp_path, "./in/model.onnx", str(ext_model), match="the output is the input model")


def test_output_symlink_to_input_is_refused(tmp_path, ext_model):
    link = tmp_path / "link.onnx"
    link.symlink_to(ext_model)
    assert_refused(tmp_path, ext_model, link, match="the output is the input model")


def test_output_hard_link_to_input_is_refused(tmp_path, ext_model):
    link = tmp_path / "hard.onnx"
    os.link(ext_model, link)
    assert_refused(tmp_path, ext_model, link, match="the output is the input model")


def test_output_equal_to_input_external_data_is_refused(tmp_path, ext_model):
    assert_refused(tmp_path, ext_model, ext_model.parent / "w.data",
                   match="the output is an external data file of the input model")


def test_output_data_file_colliding_with_input_external_data_is_refused(tmp_path, ext_model):
    # Output "in/w" writes its weights to "in/w.data": the very file the input is memory-mapped from.
    assert_refused(tmp_path, ext_model, ext_model.parent / "w", match="w.data is read by the input model")


def test_output_data_file_colliding_with_input_model_is_refused(tmp_path):
    path = save_external(matmul_model(), tmp_path / "in" / "m.onnx.data", location="w.data")
    assert_refused(tmp_path, path, tmp_path / "in" / "m.onnx", match="m.onnx.data is read by the input model")


def test_single_file_too_large_for_protobuf_is_refused_before_writing(tmp_path, ext_model, monkeypatch):
    monkeypatch.setattr(save_module, "PROTOBUF_LIMIT_BYTES", WEIGHT.nbytes - 1)
    loaded = io.load(ext_model)
    before = snapshot(tmp_path)
    with pytest.raises(OnnxlrError, match="too many for a single ONNX file.*save with external data"):
        save(loaded.model, tmp_path / "out" / "o.onnx", source=loaded, external_data=False)
    assert snapshot(tmp_path) == before


def test_output_folder_is_refused(tmp_path, ext_model):
    (tmp_path / "out").mkdir()
    assert_refused(tmp_path, ext_model, tmp_path / "out", match="is a folder")


# ----------------------------------------------------------------------------- atomic save


def _failing_save(exc: BaseException) -> Callable[..., None]:
    def fake_save(model, path, external_data=None, **kwargs):
        # Write a partial model (and partial data) where onnx_ir would, then fail half-way.
        Path(path).write_bytes(b"partial model")
        if external_data is not None:
            (Path(path).parent / external_data).write_bytes(b"partial data")
        raise exc

    return fake_save


@pytest.mark.parametrize("external", [True, False], ids=["external", "single-file"])
@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["oserror", "interrupt"])
def test_failed_save_leaves_nothing(tmp_path, ext_model, monkeypatch, exc, external):
    loaded = io.load(ext_model)
    out_dir = tmp_path / "out"
    before = snapshot(tmp_path)
    monkeypatch.setattr(save_module.ir, "save", _failing_save(exc))
    expected = OnnxlrError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        save(loaded.model, out_dir / "o.onnx", source=loaded, external_data=external)
    if expected is OnnxlrError:
        assert "No space left on device" in str(info.value) and "o.onnx" in str(info.value)
    # The output folder was created (that is harmless) but holds no model, data or temp folder.
    assert list(out_dir.iterdir()) == []
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "out"} == before


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["oserror", "interrupt"])
def test_failed_save_keeps_an_existing_output(tmp_path, ext_model, monkeypatch, exc):
    loaded = io.load(ext_model)
    out = tmp_path / "out" / "o.onnx"
    save(loaded.model, out, source=loaded)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    before = snapshot(tmp_path)
    monkeypatch.setattr(save_module.ir, "save", _failing_save(exc))
    with pytest.raises(OnnxlrError if isinstance(exc, OSError) else KeyboardInterrupt):
        save(loaded.model, out, source=loaded)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    np.testing.assert_array_equal(run_ort(out), expected_output())


# ----------------------------------------------------------------------------- round trips


def test_external_data_round_trip(tmp_path, ext_model):
    loaded = io.load(ext_model)
    assert loaded.kind == "path" and loaded.uses_external_data
    assert loaded.external_files == ((ext_model.parent / "w.data").resolve(),)
    # Memory mapped, not copied into RAM.
    assert isinstance(loaded.model.graph.initializers["W"].const_value, ir.ExternalTensor)

    out = tmp_path / "out" / "o.onnx"
    assert save(loaded.model, out, source=loaded) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    assert external_locations(out) == {"o.onnx.data"}

    reloaded = io.load(out)
    assert reloaded.external_files == ((out.parent / "o.onnx.data").resolve(),)
    np.testing.assert_array_equal(reloaded.model.graph.initializers["W"].const_value.numpy(), WEIGHT)
    np.testing.assert_array_equal(run_ort(out), run_ort(ext_model))


def test_small_threshold_forces_external_data(tmp_path):
    loaded = io.load(matmul_model())
    assert not loaded.uses_external_data
    save(loaded.model, tmp_path / "default" / "o.onnx", source=loaded)
    assert [p.name for p in (tmp_path / "default").iterdir()] == ["o.onnx"]

    out = tmp_path / "small" / "o.onnx"
    save(loaded.model, out, source=loaded, external_threshold_bytes=1000)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    assert (out.parent / "o.onnx.data").stat().st_size == WEIGHT.nbytes
    np.testing.assert_array_equal(run_ort(out), expected_output())


def _assert_self_contained(out: Path, tmp_path: Path) -> Path:
    """Copy only the model file to a fresh folder: it must load and run there with no external refs."""
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert external_locations(out) == set()
    elsewhere = tmp_path / "elsewhere" / "copy.onnx"
    elsewhere.parent.mkdir()
    shutil.copyfile(out, elsewhere)
    loaded = io.load(elsewhere)
    assert not loaded.uses_external_data
    onnx.checker.check_model(str(elsewhere), full_check=True)
    return elsewhere


def test_external_data_false_writes_a_self_contained_file(tmp_path, ext_model):
    loaded = io.load(ext_model)
    out = tmp_path / "out" / "o.onnx"
    save(loaded.model, out, source=loaded, external_data=False)
    elsewhere = _assert_self_contained(out, tmp_path)
    np.testing.assert_array_equal(run_ort(elsewhere), run_ort(ext_model))
    # The in-memory model still reads the input's data file afterwards (the swap was temporary).
    assert isinstance(loaded.model.graph.initializers["W"].const_value, ir.ExternalTensor)


def _constant_model(tmp_path: Path) -> Path:
    """The weight as a Constant node's attribute, stored as external data (convert_attribute=True)."""
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(WEIGHT, "W")),
         helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = save_external(model, tmp_path / "in" / "model.onnx", convert_attribute=True)
    assert external_locations(path) == {"w.data"}
    return path


def test_external_attribute_tensor_is_not_left_pointing_at_the_input(tmp_path):
    """Tensors in node attributes must be written out too, not saved as references to the input's file."""
    path = _constant_model(tmp_path)
    loaded = io.load(path)
    assert loaded.uses_external_data

    single = tmp_path / "single" / "o.onnx"
    save(loaded.model, single, source=loaded, external_data=False)
    np.testing.assert_array_equal(run_ort(_assert_self_contained(single, tmp_path)), run_ort(path))

    out = tmp_path / "out" / "o.onnx"
    save(loaded.model, out, source=loaded)
    assert external_locations(out) <= {"o.onnx.data"}
    moved = tmp_path / "moved"
    shutil.copytree(out.parent, moved)
    np.testing.assert_array_equal(run_ort(moved / "o.onnx"), run_ort(path))


def test_output_folder_is_created(tmp_path, ext_model):
    out = tmp_path / "a" / "b" / "c" / "o.onnx"
    optimize_in_process(ext_model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    np.testing.assert_array_equal(run_ort(out), run_ort(ext_model))


# ----------------------------------------------------------------------------- the CLI, end to end


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_signal_during_save_leaves_no_partial_output(tmp_path, signum):
    """SIGTERM or SIGINT (Ctrl-C) while the weights are being written: exit 130, and no output, data or
    temp folder."""
    # ~200 MB of weights in 50 tensors that the run leaves dense (--min-params), so the save is the
    # slow part and writes tensor by tensor, giving the signal a chance to land between writes.
    count, rows = 50, 1000
    nodes, inits = [], []
    for i in range(count):
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"h{i + 1}"], name=f"mm{i}"))
        inits.append(numpy_helper.from_array(np.full((rows, rows), 1e-3 * (i + 1), np.float32), f"W{i}"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info(f"h{count}", TensorProto.FLOAT, [1, rows])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    save_external(model, tmp_path / "in" / "model.onnx")
    del model, graph, inits
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(tmp_path)

    proc = subprocess.Popen([*onnxlr_command(), "optimize", "in/model.onnx", "out/o.onnx", "--min-params",
                             str(rows * rows + 1)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".onnxlr-tmp") for p in out_dir.iterdir()):
            if proc.poll() == 0:
                pytest.skip("the run finished before its temporary folder was seen; nothing to check")
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the save never started (rc={proc.returncode})")
            time.sleep(0.001)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        pytest.skip("the save finished before the signal arrived; nothing to check")
    assert proc.returncode == 130, stderr
    assert "interrupted; nothing was written" in stderr and "Traceback" not in stderr
    assert list(out_dir.iterdir()) == []
    assert snapshot(tmp_path) == before
