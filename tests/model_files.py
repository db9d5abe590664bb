"""Model files for test_io.py and test_save.py, and for the CLI's hostile-input corpus (test_hostile.py).

A 64x64 MatMul model, written with its weight as external data; the hostile external-data setups
(HOSTILE) and the inputs that are not models at all (NOT_A_MODEL), each with the message its refusal
must carry; a hash snapshot of a folder tree, to check that a refusal wrote and changed nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr.model_io import io
from onnxlr.model_io.save import check_output_path, save

N = 64
RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((N, N)).astype(np.float32)
X = RNG.standard_normal((1, N)).astype(np.float32)  # an input for matmul_model()


# ----------------------------------------------------------------------------- helpers


def matmul_model(weight: np.ndarray = WEIGHT) -> onnx.ModelProto:
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
    check_output_path(output, loaded)
    return save(loaded.model, output, source=loaded, **save_kwargs)


def assert_refused(tmp_path: Path, source: Path | str, output: Path | str, match: str) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(OnnxlrError, match=match):
        optimize_in_process(source, output)
    assert snapshot(tmp_path) == before


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


# ----------------------------------------------------------------------------- not a model


def _valid_bytes() -> bytes:
    return matmul_model().SerializeToString()


NOT_A_MODEL: dict[str, tuple[Callable[[Path], None] | None, str]] = {
    "missing": (None, "no such file"),
    "folder": (lambda p: p.mkdir(), "is a folder, not an ONNX model file|no .onnx model in this folder"),
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
