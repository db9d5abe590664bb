"""onnxlr.io: loading every supported kind, refusing hostile files before reading them, atomic saves.

Every refusal test checks three things: the error names the problem, nothing is written, and the
input files are byte-for-byte unchanged (a hash snapshot of the whole tmp_path tree).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import io
from onnxlr.errors import OnnxlrError

N = 64
RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((N, N)).astype(np.float32)
X = RNG.standard_normal((1, N)).astype(np.float32)


# ----------------------------------------------------------------------------- helpers


def make_model(weight: np.ndarray = WEIGHT) -> onnx.ModelProto:
    """y = x @ W with W an initializer (IR 10: onnxruntime 1.31 supports IR <= 13)."""
    rows, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def save_external(model: onnx.ModelProto, path: Path, location: str = "w.data", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0, **kwargs)
    return path


@pytest.fixture
def ext_model(tmp_path: Path) -> Path:
    """tmp_path/in/model.onnx with its 64x64 weight in tmp_path/in/w.data."""
    return save_external(make_model(), tmp_path / "in" / "model.onnx")


def set_external(model_path: Path, **entries: str) -> None:
    """Rewrite the weight's external-data entries in place (the raw proto; nothing else is touched)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    tensor = proto.graph.initializer[0]
    info = {entry.key: entry.value for entry in tensor.external_data}
    info.update(entries)
    del tensor.external_data[:]
    for key, value in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    model_path.write_bytes(proto.SerializeToString())


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: symlink target, folder, or file hash (symlinks are not followed)."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            elif not path.is_file():
                found[rel] = ("special",)  # a FIFO: reading it would block
            else:
                found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def optimize_in_process(source: Path | str, output: Path | str, **save_kwargs) -> Path:
    """What `onnxlr optimize` does around the factorization: load, check the output, save."""
    loaded = io.load(source)
    io.check_output_path(output, loaded)
    return io.save(loaded.model, output, source=loaded, **save_kwargs)


def assert_refused(tmp_path: Path, source: Path | str, output: Path | str, match: str) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(OnnxlrError, match=match):
        optimize_in_process(source, output)
    assert snapshot(tmp_path) == before


def run_ort(model: Path | bytes) -> np.ndarray:
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


def expected_output() -> np.ndarray:
    """What onnxruntime computes for the original model (numpy's x @ W rounds differently)."""
    return run_ort(make_model().SerializeToString())


def _tensors(nodes, initializers=()):
    """Every TensorProto in initializers and node attributes, subgraphs included."""
    yield from initializers
    for node in nodes:
        for attr in node.attribute:
            yield from [attr.t] if attr.HasField("t") else []
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else []:
                yield from _tensors(sub.node, sub.initializer)
            for sub in attr.graphs:
                yield from _tensors(sub.node, sub.initializer)


def external_locations(path: Path) -> set[str]:
    """Locations of every external tensor in the file: initializers, attributes and functions."""
    proto = onnx.load(str(path), load_external_data=False)
    tensors = [*_tensors(proto.graph.node, proto.graph.initializer)]
    for function in proto.functions:
        tensors.extend(_tensors(function.node))
    return {
        entry.value
        for tensor in tensors
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def onnxlr_command() -> list[str]:
    script = Path(sys.executable).parent / "onnxlr"
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxlr"]


# ----------------------------------------------------------------------------- hostile external data


def _move_data_outside(tmp_path: Path, model_path: Path) -> Path:
    """Move the (valid, full-size) data file out of the model's folder; return its new path."""
    outside = tmp_path / "outside" / "w.data"
    outside.parent.mkdir()
    shutil.move(model_path.parent / "w.data", outside)
    return outside


def _dotdot(tmp_path: Path, model_path: Path) -> None:
    _move_data_outside(tmp_path, model_path)
    set_external(model_path, location="../outside/w.data")


def _dotdot_nested(tmp_path: Path, model_path: Path) -> None:
    _move_data_outside(tmp_path, model_path)
    (model_path.parent / "sub").mkdir()
    set_external(model_path, location="sub/../../outside/w.data")


def _absolute(tmp_path: Path, model_path: Path) -> None:
    outside = _move_data_outside(tmp_path, model_path)
    set_external(model_path, location=str(outside))


def _symlinked_file(tmp_path: Path, model_path: Path) -> None:
    outside = _move_data_outside(tmp_path, model_path)
    (model_path.parent / "w.data").symlink_to(outside)


def _symlinked_folder(tmp_path: Path, model_path: Path) -> None:
    outside = _move_data_outside(tmp_path, model_path)
    (model_path.parent / "sub").symlink_to(outside.parent, target_is_directory=True)
    set_external(model_path, location="sub/w.data")


def _hard_link(tmp_path: Path, model_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    os.link(model_path.parent / "w.data", tmp_path / "outside" / "w.data")


def _missing(tmp_path: Path, model_path: Path) -> None:
    (model_path.parent / "w.data").unlink()


def _truncated(tmp_path: Path, model_path: Path) -> None:
    with open(model_path.parent / "w.data", "r+b") as f:
        f.truncate(1000)


def _folder(tmp_path: Path, model_path: Path) -> None:
    (model_path.parent / "datadir").mkdir()
    set_external(model_path, location="datadir")


def _dot(tmp_path: Path, model_path: Path) -> None:
    set_external(model_path, location=".")


def _empty_location(tmp_path: Path, model_path: Path) -> None:
    set_external(model_path, location="")


def _offset_text(tmp_path: Path, model_path: Path) -> None:
    set_external(model_path, offset="abc")


def _length_float(tmp_path: Path, model_path: Path) -> None:
    set_external(model_path, length="16384.0")


def _offset_negative(tmp_path: Path, model_path: Path) -> None:
    set_external(model_path, offset="-4")


def _length_short(tmp_path: Path, model_path: Path) -> None:
    set_external(model_path, length="100")


def _set_dtype(model_path: Path, data_type: int) -> None:
    proto = onnx.load(str(model_path), load_external_data=False)
    proto.graph.initializer[0].data_type = data_type
    model_path.write_bytes(proto.SerializeToString())


def _string_dtype_escaping(tmp_path: Path, model_path: Path) -> None:
    _set_dtype(model_path, TensorProto.STRING)
    _dotdot(tmp_path, model_path)  # the escaping location is reported first


def _string_dtype(tmp_path: Path, model_path: Path) -> None:
    _set_dtype(model_path, TensorProto.STRING)  # no fixed width: ONNX never stores these externally


def _undefined_dtype(tmp_path: Path, model_path: Path) -> None:
    _set_dtype(model_path, TensorProto.UNDEFINED)


HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "dotdot": (_dotdot, "leaves the model's folder"),
    "dotdot-nested": (_dotdot_nested, "leaves the model's folder"),
    "absolute": (_absolute, "is an absolute path"),
    "symlinked-file": (_symlinked_file, "symbolic link"),
    "symlinked-folder": (_symlinked_folder, "symbolic link"),
    "hard-link": (_hard_link, "several hard links"),
    "missing": (_missing, "w.data' is missing"),
    "truncated": (_truncated, "is 1000 bytes but the tensors need 16384"),
    "folder": (_folder, "'datadir' is not a regular file"),
    "dot": (_dot, "'.' is not a regular file"),
    "empty-location": (_empty_location, "has no location"),
    "offset-not-number": (_offset_text, "offset/length is not a number"),
    "length-not-number": (_length_float, "offset/length is not a number"),
    "offset-negative": (_offset_negative, "offset/length is negative"),
    "length-short": (_length_short, "length 100 is shorter than the tensor's 16384 bytes"),
    "string-dtype-escaping": (_string_dtype_escaping, "leaves the model's folder"),
    "string-dtype": (_string_dtype, "data type 8, which has no fixed size"),
    "undefined-dtype": (_undefined_dtype, "data type 0, which has no fixed size"),
}


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
    io.save(loaded.model, out, source=loaded)
    assert external_locations(out) <= {"o.onnx.data"}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {})[0], values)


# ----------------------------------------------------------------------------- not a model


def _valid_bytes() -> bytes:
    return make_model().SerializeToString()


NOT_A_MODEL: dict[str, tuple[Callable[[Path], None] | None, str]] = {
    "missing": (None, "no such file"),
    "folder": (lambda p: p.mkdir(), "is a folder, not an ONNX model file"),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty"),
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)), "not (a valid|an) ONNX model"),
    "text": (lambda p: p.write_text("hello, this is not a model\n"), "not (a valid|an) ONNX model"),
    "truncated-protobuf": (lambda p: p.write_bytes(_valid_bytes()[: len(_valid_bytes()) // 2]),
                           "not a valid ONNX model"),
    "tensor-proto": (lambda p: p.write_bytes(numpy_helper.from_array(WEIGHT, "W").SerializeToString()),
                     "not (a valid|an) ONNX model"),
    "model-without-graph": (lambda p: p.write_bytes(
        onnx.ModelProto(ir_version=10, opset_import=[helper.make_opsetid("", 17)]).SerializeToString()),
        "not an ONNX model .it has no graph"),
    "fifo": (lambda p: os.mkfifo(p), "not a regular file"),
}


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
        io.load(_valid_bytes())


def test_proto_with_external_data_but_no_folder_is_refused(ext_model):
    proto = onnx.load(str(ext_model), load_external_data=False)
    with pytest.raises(OnnxlrError, match="references external data but has no folder"):
        io.load(proto)


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
    path = save_external(make_model(), tmp_path / "in" / "m.onnx.data", location="w.data")
    assert_refused(tmp_path, path, tmp_path / "in" / "m.onnx", match="m.onnx.data is read by the input model")


def test_single_file_too_large_for_protobuf_is_refused_before_writing(tmp_path, ext_model, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT_BYTES", WEIGHT.nbytes - 1)
    loaded = io.load(ext_model)
    before = snapshot(tmp_path)
    with pytest.raises(OnnxlrError, match="too many for a single ONNX file.*save with external data"):
        io.save(loaded.model, tmp_path / "out" / "o.onnx", source=loaded, external_data=False)
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
    monkeypatch.setattr(io.ir, "save", _failing_save(exc))
    expected = OnnxlrError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        io.save(loaded.model, out_dir / "o.onnx", source=loaded, external_data=external)
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
    io.save(loaded.model, out, source=loaded)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    before = snapshot(tmp_path)
    monkeypatch.setattr(io.ir, "save", _failing_save(exc))
    with pytest.raises(OnnxlrError if isinstance(exc, OSError) else KeyboardInterrupt):
        io.save(loaded.model, out, source=loaded)
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
    assert io.save(loaded.model, out, source=loaded) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    assert external_locations(out) == {"o.onnx.data"}

    reloaded = io.load(out)
    assert reloaded.external_files == ((out.parent / "o.onnx.data").resolve(),)
    np.testing.assert_array_equal(reloaded.model.graph.initializers["W"].const_value.numpy(), WEIGHT)
    np.testing.assert_array_equal(run_ort(out), run_ort(ext_model))


def test_small_threshold_forces_external_data(tmp_path):
    loaded = io.load(make_model())
    assert not loaded.uses_external_data
    io.save(loaded.model, tmp_path / "default" / "o.onnx", source=loaded)
    assert [p.name for p in (tmp_path / "default").iterdir()] == ["o.onnx"]

    out = tmp_path / "small" / "o.onnx"
    io.save(loaded.model, out, source=loaded, external_threshold_bytes=1000)
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
    io.save(loaded.model, out, source=loaded, external_data=False)
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
    io.save(loaded.model, single, source=loaded, external_data=False)
    np.testing.assert_array_equal(run_ort(_assert_self_contained(single, tmp_path)), run_ort(path))

    out = tmp_path / "out" / "o.onnx"
    io.save(loaded.model, out, source=loaded)
    assert external_locations(out) <= {"o.onnx.data"}
    moved = tmp_path / "moved"
    shutil.copytree(out.parent, moved)
    np.testing.assert_array_equal(run_ort(moved / "o.onnx"), run_ort(path))


def test_output_folder_is_created(tmp_path, ext_model):
    out = tmp_path / "a" / "b" / "c" / "o.onnx"
    optimize_in_process(ext_model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    np.testing.assert_array_equal(run_ort(out), run_ort(ext_model))


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
    proto = make_model()
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
    model = ir.serde.deserialize_model(make_model())
    before = ir.serde.serialize_model(model).SerializeToString()
    loaded = io.load(model)
    assert loaded.kind == "ir" and loaded.model is not model
    _mutate(loaded.model)
    result = io.convert(loaded.model, loaded.kind)
    assert isinstance(result, ir.Model) and result is not model
    assert result.graph.node(0).name == "changed"
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_load_graphsurgeon_graph_leaves_the_callers_graph_alone():
    graph = gs.import_onnx(make_model())
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
        io.convert(ir.serde.deserialize_model(make_model()), "pickle")


# ----------------------------------------------------------------------------- the CLI, end to end


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*onnxlr_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["dotdot", "output-is-input"])
def test_cli_refuses_with_a_short_message(tmp_path, ext_model, case):
    if case == "dotdot":
        _dotdot(tmp_path, ext_model)
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
