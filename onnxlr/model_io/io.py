"""Load stage (load -> ... -> save): read a model of any supported kind and refuse hostile input.

Models are held as `onnx_ir.Model`. External data stays memory-mapped (onnx-ir's ExternalTensor),
so a large model is never copied into RAM just to be loaded. Every external-data location is
checked *before* anything is read: it must name a regular file inside the model's folder, reached
without symbolic links, with a single hard link, and long enough for the tensor. The graph's
structure and every stored tensor are checked too. Writing the result is onnxlr.model_io.save's stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxlr.errors import OnnxlrError


@dataclasses.dataclass
class LoadedModel:
    """A model in onnx-ir form plus what we need to know about where it came from."""

    model: ir.Model
    kind: str  # "path", "proto", "ir" or "graphsurgeon": what the caller gave us
    path: Path | None = None
    external_files: tuple[Path, ...] = ()  # resolved external-data files the model reads

    @property
    def uses_external_data(self) -> bool:
        return bool(self.external_files)


# ----------------------------------------------------------------------------- loading


def load(source: Any) -> LoadedModel:
    """Load a model from a path, an `onnx.ModelProto`, an `onnx_ir.Model` or a graphsurgeon `Graph`.

    The caller's object is never modified: protos are deserialized into a new IR model and IR
    models are cloned.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(_proto_to_ir(source, base_dir=None, what="the ModelProto"), kind="proto")
    if isinstance(source, ir.Model):
        return LoadedModel(source.clone(), kind="ir")
    if _is_graphsurgeon_graph(source):
        import onnx_graphsurgeon as gs

        proto = gs.export_onnx(source)
        return LoadedModel(_proto_to_ir(proto, base_dir=None, what="the graphsurgeon Graph"), kind="graphsurgeon")
    raise OnnxlrError(
        f"cannot load a model from a {type(source).__name__}: "
        "pass a path, an onnx.ModelProto, an onnx_ir.Model or an onnx_graphsurgeon.Graph"
    )


def convert(model: ir.Model, kind: str) -> Any:
    """Return `model` as the kind of object the caller gave us (see `LoadedModel.kind`)."""
    if kind in ("ir", "path"):
        return model
    proto = ir.serde.serialize_model(model)
    if kind == "proto":
        return proto
    if kind == "graphsurgeon":
        import onnx_graphsurgeon as gs

        return gs.import_onnx(proto)
    raise ValueError(f"unknown model kind {kind!r}")


def _is_graphsurgeon_graph(obj: Any) -> bool:
    cls = type(obj)
    return cls.__name__ == "Graph" and cls.__module__.startswith("onnx_graphsurgeon")


def _load_path(path: Path) -> LoadedModel:
    if not path.exists():
        raise OnnxlrError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxlrError(f"{path}: is a folder, not an ONNX model file")
    # A FIFO or device would report size 0 (or block on read): say what it is instead.
    if not path.is_file():
        raise OnnxlrError(f"{path}: not a regular file, so not an ONNX model file")
    if path.stat().st_size == 0:
        raise OnnxlrError(f"{path}: the file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as exc:  # unreadable (permissions, I/O error): bad input, not a bug
        raise OnnxlrError(f"{path}: cannot read it ({first_line(exc)})") from exc
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise OnnxlrError(f"{path}: not a valid ONNX model ({first_line(exc)})") from exc
    base_dir = path.resolve().parent
    external_files = check_external_data(proto, base_dir, model_name=str(path))
    model = _proto_to_ir(proto, base_dir=base_dir, what=str(path))
    return LoadedModel(model, kind="path", path=path, external_files=external_files)


def _proto_to_ir(proto: onnx.ModelProto, base_dir: Path | None, what: str) -> ir.Model:
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise OnnxlrError(f"{what}: not an ONNX model (it has no graph); is it a tensor or another protobuf?")
    if proto.ir_version <= 0:
        raise OnnxlrError(f"{what}: not an ONNX model (ir_version is missing)")
    default_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    check_graph_structure(proto.graph, what, default_opset)
    for tensor in _iter_model_tensors(proto):
        _check_tensor_data(tensor, what)
    if base_dir is None and any(_uses_external_data(t) for t in _iter_model_tensors(proto)):
        raise OnnxlrError(
            f"{what} references external data but has no folder to read it from: pass the model's path instead"
        )
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types for malformed graphs
        raise OnnxlrError(f"{what}: the graph is malformed ({first_line(exc)})") from exc
    if base_dir is not None:
        # Function bodies too: set_base_dir(model.graph) does not reach them, and a tensor left
        # without a base folder would be read relative to the current directory.
        for graph in (model.graph, *(function.graph for function in model.functions.values())):
            ir.external_data.set_base_dir(graph, base_dir)
    return model


def check_graph_structure(graph: onnx.GraphProto, what: str, opset: int | None = None,
                          outer: frozenset[str] = frozenset()) -> None:
    """Refuse a graph no runtime can execute, before the passes trip on it: a value defined twice, a
    node or graph output reading a value that nothing defines, a cycle, a standard op with the wrong
    number of inputs or an attribute of the wrong type (a STRING `group`).

    Subgraphs (If/Loop/Scan bodies) are checked too; they may read every value of the scopes around
    them. Node order is not required to be topological, only possible (Kahn's algorithm).
    """
    inputs = [v.name for v in graph.input]
    if len(set(inputs)) < len(inputs):
        twice = next(name for name in inputs if inputs.count(name) > 1)
        raise OnnxlrError(f"{what}: graph input {twice!r} is declared twice; the model is malformed")
    defined = set(outer) | set(inputs) | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    produced = {name for node in graph.node for name in node.output if name}

    def label(index: int) -> str:
        node = graph.node[index]
        return repr(node.name) if node.name else f"#{index} ({node.op_type or 'no op type'})"

    waiting: dict[str, list[int]] = {}
    pending: list[int] = []
    for index, node in enumerate(graph.node):
        missing = [name for name in node.input if name and name not in defined and name not in produced]
        if missing:
            raise OnnxlrError(f"{what}: node {label(index)} reads {missing[0]!r}, which is not a graph input, an "
                              "initializer or the output of any node; the model is malformed")
        shadowed = [name for name in node.output if name in defined and name not in outer]
        if shadowed:
            raise OnnxlrError(f"{what}: node {label(index)} writes {shadowed[0]!r}, which is already a graph input "
                              "or an initializer; the model is malformed")
        _check_node_schema(node, opset, f"{what}: node {label(index)}")
        needs = {name for name in node.input if name and name not in defined}
        pending.append(len(needs))
        for name in needs:
            waiting.setdefault(name, []).append(index)
    for value in graph.output:
        if value.name not in defined and value.name not in produced:
            raise OnnxlrError(f"{what}: graph output {value.name!r} is not produced by any node; the model is "
                              "malformed")
    ready = [index for index, count in enumerate(pending) if count == 0]
    done = 0
    while ready:
        node = graph.node[ready.pop()]
        done += 1
        for name in node.output:
            for index in waiting.pop(name, ()):
                pending[index] -= 1
                if pending[index] == 0:
                    ready.append(index)
    if done < len(graph.node):
        stuck = next(index for index, count in enumerate(pending) if count > 0)
        raise OnnxlrError(f"{what}: the graph has a cycle (through node {label(stuck)}); not a valid ONNX model")
    scope = frozenset(defined | produced)
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                check_graph_structure(sub, what, opset, scope)


def _check_node_schema(node: onnx.NodeProto, opset: int | None, where: str) -> None:
    """A standard op's input count and attribute types, from its ONNX schema at the model's opset."""
    if not node.op_type:
        raise OnnxlrError(f"{where} has no op type; the model is malformed")
    if opset is None or node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:  # an op onnx does not know: onnxruntime will say so
        return
    if not schema.min_input <= len(node.input) <= schema.max_input:
        expected = (str(schema.min_input) if schema.min_input == schema.max_input
                    else f"{schema.min_input} to {schema.max_input}")
        raise OnnxlrError(f"{where}: {node.op_type} takes {expected} inputs, the node has {len(node.input)}; "
                          "the model is malformed")
    for attr in node.attribute:
        declared = schema.attributes.get(attr.name)
        # onnx's stubs leave out AttrType.value (a pybind11 enum has it): the two ignores below.
        if declared is None or attr.type == onnx.AttributeProto.UNDEFINED or attr.type == declared.type.value:  # type: ignore[attr-defined]
            continue
        names = onnx.AttributeProto.AttributeType.Name
        raise OnnxlrError(f"{where}: attribute {attr.name!r} is {names(attr.type)} but {node.op_type} takes "
                          f"{names(declared.type.value)}; the model is malformed")  # type: ignore[attr-defined]


# Where a tensor keeps its values when raw_data is not used (one entry per element), by data type.
_TYPED_FIELDS: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data", onnx.TensorProto.STRING: "string_data",
    **dict.fromkeys((onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
                     onnx.TensorProto.UINT8, onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT16,
                     onnx.TensorProto.BFLOAT16), "int32_data"),
}


def _check_tensor_data(tensor: onnx.TensorProto, what: str) -> None:
    """Refuse a stored tensor whose data does not fill its dims (it could never be read back)."""
    where = f"{what}: tensor {tensor.name!r}"
    if any(d < 0 for d in tensor.dims):
        raise OnnxlrError(f"{where} has a negative dimension {list(tensor.dims)}; the model is malformed")
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise OnnxlrError(f"{where} has no data type; the model is malformed")
    if _uses_external_data(tensor) or tensor.HasField("segment"):
        return  # external data: checked against its file by check_external_data
    if tensor.raw_data:
        have, need, unit = len(tensor.raw_data), _tensor_nbytes(tensor), "bytes"
    elif tensor.data_type in _TYPED_FIELDS:
        have, need, unit = len(getattr(tensor, _TYPED_FIELDS[tensor.data_type])), math.prod(tensor.dims), "values"
    else:
        return
    if need is not None and have != need:
        raise OnnxlrError(f"{where} holds {have} {unit} of data but its dims {list(tensor.dims)} need {need}; "
                          "the model is malformed")


def first_line(exc: BaseException) -> str:
    """An exception's message for a one-line error (its type when it has none); saving uses it too."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# ----------------------------------------------------------------------------- external data


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _iter_model_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a model: the main graph's and those in model-local function bodies."""
    yield from _iter_tensors(proto.graph)
    for function in proto.functions:
        yield from _iter_node_tensors(function.node)


def _iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _iter_node_tensors(graph.node)


def _iter_node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def check_external_data(proto: onnx.ModelProto, base_dir: Path, model_name: str) -> tuple[Path, ...]:
    """Refuse external data that escapes `base_dir`, is missing, or is too short. Returns the files used."""
    files: dict[Path, int] = {}  # resolved file -> bytes the tensors need
    for tensor in _iter_model_tensors(proto):
        if not _uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{model_name}: tensor {tensor.name!r}"
        data_file = resolve_external_location(location, base_dir, where)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError as exc:
            raise OnnxlrError(f"{where}: external data offset/length is not a number") from exc
        if offset < 0 or (length is not None and length < 0):
            raise OnnxlrError(f"{where}: external data offset/length is negative")
        needed = _tensor_nbytes(tensor)
        if needed is None:
            # ONNX stores only fixed-width types externally; anything else is malformed.
            raise OnnxlrError(f"{where}: external data for data type {tensor.data_type}, which has no fixed size; "
                              "refused")
        if length is not None and length < needed:
            raise OnnxlrError(f"{where}: external data length {length} is shorter than the tensor's {needed} bytes")
        end = offset + (length if length is not None else needed)
        files[data_file] = max(files.get(data_file, 0), end)
    for data_file, end in files.items():
        size = data_file.stat().st_size
        if size < end:
            raise OnnxlrError(
                f"{model_name}: external data file {data_file.name} is {size} bytes but the tensors need {end}: "
                "the file is truncated or belongs to another model"
            )
    return tuple(sorted(files))


def resolve_external_location(location: str, base_dir: Path, where: str) -> Path:
    """Resolve an external-data `location` inside `base_dir`, refusing anything that could escape it."""
    if not location:
        raise OnnxlrError(f"{where}: external data has no location")
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise OnnxlrError(f"{where}: external data location {location!r} is an absolute path; only files "
                          "inside the model's folder are read")
    if ".." in rel.parts or "\\" in location or "\x00" in location:
        raise OnnxlrError(f"{where}: external data location {location!r} leaves the model's folder; refused")
    # Walk component by component so that a symlinked folder or file is refused, wherever it points.
    current = base_dir
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise OnnxlrError(f"{where}: external data location {location!r} goes through a symbolic link; refused")
    if not current.exists():
        raise OnnxlrError(f"{where}: external data file {location!r} is missing (looked in {base_dir})")
    info = current.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OnnxlrError(f"{where}: external data location {location!r} is not a regular file")
    if info.st_nlink > 1:
        raise OnnxlrError(f"{where}: external data file {location!r} has several hard links and may belong to "
                          "a file outside the model's folder; refused (copy it instead)")
    resolved = current.resolve()
    if not resolved.is_relative_to(base_dir.resolve()):
        raise OnnxlrError(f"{where}: external data location {location!r} leaves the model's folder; refused")
    return resolved


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's data takes; None for a type without a fixed width (STRING, UNDEFINED, unknown)."""
    try:
        bitwidth = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):  # TypeError: STRING and UNDEFINED have no bitwidth
        return None
    # Python ints: np.prod would wrap around on hostile dims; negative dims count as empty.
    count = math.prod(max(int(d), 0) for d in tensor.dims)
    return (count * bitwidth + 7) // 8


def file_bytes(path: str | os.PathLike) -> int:
    """What a model weighs on disk: its file and the external-data files it reads."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    files = check_external_data(proto, path.resolve().parent, model_name=str(path))
    return path.stat().st_size + sum(data_file.stat().st_size for data_file in files)
