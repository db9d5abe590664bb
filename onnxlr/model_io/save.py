"""Save stage (load -> ... -> save): write a model atomically, with or without external data.

The model and its data file are written to a temporary folder next to the target and renamed into
place (data first, model last) with SIGINT/SIGTERM held, so an interrupted or refused save leaves
no output behind. The output may never be the input model or one of its external data files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import onnx_ir as ir

from onnxlr.errors import OnnxlrError
from onnxlr.model_io.io import LoadedModel, first_line

if TYPE_CHECKING:
    # The base of every onnx-ir tensor class (not exported as ir.TensorBase).
    from onnx_ir._core import TensorBase

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT_BYTES = 2**31 - 2**26


def model_nbytes(model: ir.Model) -> int:
    """Bytes of all initializers in every graph (what the file would hold)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def use_external_data(model: ir.Model, source: LoadedModel | None, external_data: bool | None,
                      external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES) -> bool:
    """The rule for the output: as asked, else external when the source was or the model exceeds the threshold."""
    if external_data is not None:
        return external_data
    return bool(source and source.uses_external_data) or model_nbytes(model) > external_threshold_bytes


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    source: LoadedModel | None = None,
    external_data: bool | None = None,
    external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES,
) -> Path:
    """Save `model` to `path` atomically and return the path.

    External data is used when `external_data` is True, or when it is None and either the source
    used external data or the model is larger than `external_threshold_bytes`. The model and its
    data file are first written to a temporary folder next to the target, then renamed into
    place (data first, model last), so an interrupted save leaves no output behind.
    """
    with staged_save(model, path, source=source, external_data=external_data,
                     external_threshold_bytes=external_threshold_bytes):
        pass
    return Path(path)


@contextlib.contextmanager
def staged_save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    source: LoadedModel | None = None,
    external_data: bool | None = None,
    external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES,
) -> Iterator[Path]:
    """Write the model to a temporary folder next to `path` and yield the temporary model's path.

    When the `with` block ends normally the files are renamed into place; when it raises (a
    failed verification gate, Ctrl-C), the temporary folder is removed and nothing is written.
    """
    path = Path(path)
    check_output_path(path, source)
    external = use_external_data(model, source, external_data, external_threshold_bytes)
    if not external:
        _check_single_file_size(model, path)  # before anything is written
    with staging(path, source=source, external_data=external) as stage:
        yield stage.write_model(model)


def _check_single_file_size(model: ir.Model, path: Path) -> None:
    if (nbytes := model_nbytes(model)) > PROTOBUF_LIMIT_BYTES:
        # Refuse before writing: protobuf would fail only after the whole model was serialized.
        raise OnnxlrError(f"{path}: the weights take {nbytes} bytes, too many for a single ONNX file "
                          "(protobuf's 2 GB limit); save with external data")


# External tensors start at multiples of this (a page): runtimes can then map them directly.
DATA_ALIGNMENT = 4096
# Initializers up to this size stay inside the model file (norm scales, shapes).
EXTERNAL_MIN_BYTES = 1024


class DataFile:
    """The output's external-data file, written front to back while the model is being rewritten.

    `append` writes a tensor at the next aligned offset and returns an ExternalTensor pointing at it,
    so a layer's factors leave memory as soon as they exist. Only the thread that rewrites the
    graph appends (in graph order), which makes the layout deterministic.
    """

    def __init__(self, folder: Path, name: str, target: Path) -> None:
        self.folder, self.name, self._target = folder, name, target
        self._file = open(folder / name, "wb")  # noqa: SIM115 (closed by close(), also on failure)
        self._offset = 0
        # The tensors handed out, kept alive so that their ids stay theirs (holds() compares ids).
        self._stored: dict[int, ir.ExternalTensor] = {}

    def append(self, tensor: ir.TensorProtocol) -> ir.ExternalTensor:
        offset = -(-self._offset // DATA_ALIGNMENT) * DATA_ALIGNMENT
        try:
            self._file.write(b"\0" * (offset - self._offset))
            # An ExternalTensor is copied file to file, never through RAM (every onnx-ir tensor class has tofile).
            cast("TensorBase", tensor).tofile(self._file)
            self._file.flush()
        except OSError as exc:
            raise OnnxlrError(f"{self._target}: writing the model failed ({first_line(exc)}); "
                              "nothing was written") from exc
        self._offset = offset + tensor.nbytes
        stored = ir.ExternalTensor(self.name, offset, tensor.nbytes, tensor.dtype,
                                   shape=cast(ir.Shape, tensor.shape),  # every onnx-ir tensor's is an ir.Shape
                                   name=tensor.name,  # type: ignore[arg-type]  # onnx-ir annotates str, takes None too
                                   base_dir=str(self.folder))
        self._stored[id(stored)] = stored
        return stored

    def holds(self, tensor: Any) -> bool:
        return id(tensor) in self._stored

    def moved_to(self, folder: Path) -> None:
        """After the rename: the tensors in the model now read the file from its final folder."""
        for tensor in self._stored.values():
            tensor.base_dir = str(folder)

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass
class Stage:
    """A save in progress: the temporary folder next to the output and, with external data, its data file."""

    target: Path  # the final model path
    folder: Path  # the temporary folder
    data: DataFile | None  # open while the output uses external data

    @property
    def model_path(self) -> Path:
        return self.folder / self.target.name

    def write_model(self, model: ir.Model) -> Path:
        """Write what the data file does not hold yet, then the model itself; returns the temporary model path."""
        try:
            if self.data is None:
                _check_single_file_size(model, self.target)
                # Every tensor in memory: a single-file model carries its weights.
                with _tensors_in_memory(model, initializers=True):
                    ir.save(model, self.model_path)
            else:
                # Attribute tensors in memory (they would stay references to the input's data file),
                # initializers moved into the output's data file.
                with _tensors_in_memory(model, initializers=False), _initializers_in(model, self.data):
                    ir.save(model, self.model_path)
                self.data.close()
        except OSError as exc:
            raise OnnxlrError(f"{self.target}: writing the model failed ({first_line(exc)}); "
                              "nothing was written") from exc
        return self.model_path


@contextlib.contextmanager
def staging(path: str | os.PathLike, *, source: LoadedModel | None = None, external_data: bool) -> Iterator[Stage]:
    """A temporary folder next to `path` (and the output's data file in it) for the caller to fill.

    The caller writes the model with `Stage.write_model` (factors may already have gone into
    `Stage.data`). When the `with` block ends normally the files are renamed into place, data
    first and model last; when it raises (a failed gate, Ctrl-C, SIGTERM), the temporary folder
    is removed and nothing is written.
    """
    path = Path(path)
    check_output_path(path, source)
    data_name = path.name + ".data"
    # The data file is replaced in place: it must not be a file the input model reads (or the input itself).
    input_files = (*source.external_files, source.path.resolve()) if source and source.path else ()
    if external_data and (path.parent.resolve() / data_name) in input_files:
        raise OnnxlrError(f"{path}: its external data file {data_name} is read by the input model; "
                          "choose another output name")

    # OSError (no space, no permission) is bad input or environment, not a bug: report it as such.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxlrError(f"{path}: cannot write there ({first_line(exc)})") from exc
    # The name is chosen before the folder exists, so an interrupt that lands just after mkdir
    # (or inside it) still reaches the `finally` below that removes it.
    tmp_dir = path.parent / f".{path.name}.{secrets.token_hex(8)}.onnxlr-tmp"
    data: DataFile | None = None
    try:
        with _signals_deferred():
            try:
                tmp_dir.mkdir(mode=0o700)
                data = DataFile(tmp_dir, data_name, path) if external_data else None
            except OSError as exc:
                raise OnnxlrError(f"{path}: cannot write there ({first_line(exc)})") from exc
        yield Stage(target=path, folder=tmp_dir, data=data)
        # Ctrl-C between the two renames would leave a new data file beside the old model.
        with _signals_deferred():
            try:
                if external_data:
                    os.replace(tmp_dir / data_name, path.parent / data_name)
                os.replace(tmp_dir / path.name, path)
            except OSError as exc:
                raise OnnxlrError(f"{path}: moving the model into place failed ({first_line(exc)})") from exc
        if data is not None:
            data.moved_to(path.parent)
    finally:
        with _signals_deferred():
            if data is not None:
                data.close()
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("saved %s%s", path, " with external data" if external_data else "")


@contextlib.contextmanager
def _initializers_in(model: ir.Model, data: DataFile) -> Iterator[None]:
    """Point every initializer at `data` for the serialization, appending those it does not hold yet.

    Small ones go inline. The model's own tensors are put back afterwards (the caller's model is
    unchanged); factors streamed into `data` were already references to it and stay so.
    """
    swapped: list[tuple[ir.Value, Any]] = []
    replacements: dict[int, Any] = {}  # one tensor object behind several initializers is stored once
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or data.holds(tensor):
                    continue
                if id(tensor) not in replacements:
                    if tensor.nbytes > EXTERNAL_MIN_BYTES:
                        replacements[id(tensor)] = data.append(tensor)
                    elif isinstance(tensor, ir.ExternalTensor):
                        replacements[id(tensor)] = _in_memory(tensor)
                    else:
                        continue
                swapped.append((value, tensor))
                value.const_value = replacements[id(tensor)]
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, so a short critical step is never cut in half.

    The signal is delivered (and its Python handler runs) as soon as the mask is restored.
    """
    deferrable = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not deferrable:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def check_output_path(path: str | os.PathLike, source: LoadedModel | None) -> None:
    """Refuse an output that is a folder, the input model, or one of the input's external data files."""
    path = Path(path)
    if path.is_dir():
        raise OnnxlrError(f"{path}: is a folder; give the output model's file name")
    if source is None or source.path is None:
        return
    target = path.resolve()
    if target == source.path.resolve() or (path.exists() and path.samefile(source.path)):
        raise OnnxlrError(f"{path}: the output is the input model; write to another file (the input is never modified)")
    if target in source.external_files:
        raise OnnxlrError(f"{path}: the output is an external data file of the input model; write elsewhere")


class _tensors_in_memory:
    """Temporarily replace memory-mapped external tensors by in-memory copies.

    Node attributes (Constant values), in every graph and function body, always; initializers only
    when `initializers` is True (a single-file save). onnx-ir's save moves initializers to the new
    data file itself but writes an external attribute tensor as it found it: a reference to the
    input's data file, which the output's folder does not have.
    """

    def __init__(self, model: ir.Model, initializers: bool) -> None:
        self._model = model
        self._initializers = initializers
        self._values: list[tuple[ir.Value, Any]] = []
        self._attrs: list[tuple[ir.Node, ir.Attr]] = []

    def __enter__(self) -> None:
        functions = self._model.functions.values()
        graphs = [*self._model.graphs(), *(g for f in functions for g in (f.graph, *f.graph.subgraphs()))]
        for graph in graphs:
            for value in graph.initializers.values() if self._initializers else ():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    self._values.append((value, tensor))
                    value.const_value = _in_memory(tensor)
            for node in graph:
                for name, attr in list(node.attributes.items()):
                    if attr.is_ref() or attr.type not in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
                        continue
                    tensors = attr.value if attr.type == ir.AttributeType.TENSORS else (attr.value,)
                    if not any(isinstance(t, ir.ExternalTensor) for t in tensors):
                        continue
                    loaded = [_in_memory(t) if isinstance(t, ir.ExternalTensor) else t for t in tensors]
                    replacement = loaded if attr.type == ir.AttributeType.TENSORS else loaded[0]
                    self._attrs.append((node, attr))
                    node.attributes[name] = ir.Attr(name, attr.type, replacement, doc_string=attr.doc_string)

    def __exit__(self, *exc: object) -> None:
        for value, tensor in self._values:
            value.const_value = tensor
        for node, attr in self._attrs:
            node.attributes[attr.name] = attr


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string)
