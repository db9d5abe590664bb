"""Shapes: ONNX shape inference on an onnx-ir model without copying its weights, and the model's opset.

Every stage that needs a static shape (the rules' MAC counts, the cost model, edge estimates)
reads the dict `infer_shapes` returns: value name -> tuple of dims (None where unknown).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import onnx
import onnx_ir as ir

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)


def default_opset(model: ir.Model) -> int:
    """The model's default-domain ("" or "ai.onnx") opset version; 1 when it imports neither."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def infer_shapes(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None
                 ) -> dict[str, tuple | None]:
    """Static shapes by value name from ONNX shape inference (unknown dims as None), all graphs included.

    `input_shapes` fixes graph inputs' dimensions first (`--shape input_ids:1x128`). Inference runs
    on a serialized copy in which every initializer is a data-less external reference, so no
    weight is copied; a model onnx cannot infer (custom ops, say) just yields fewer shapes.
    """
    shapes: dict[str, tuple | None] = {}
    try:
        inferred = _inferred(model, input_shapes)
    except OnnxlrError:
        raise
    except Exception as exc:  # inference is best effort: MACs become per unit of unknown dims
        logger.info("shape inference failed: %s", exc)
        return shapes
    _collect_shapes(inferred.graph, shapes)
    return shapes


def named_dims(model: ir.Model) -> dict[str, tuple]:
    """Main-graph dims by value name from ONNX shape inference: each an int, the dim's name (a str) or None.

    (infer_shapes keeps sizes only; names are what tell an encoder's sequence from a decoder's.)
    Best effort: a model onnx cannot infer yields an empty mapping."""
    try:
        graph = _inferred(model).graph
    except Exception as exc:
        logger.info("shape inference failed: %s", exc)
        return {}
    return {info.name: tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                             for d in info.type.tensor_type.shape.dim)
            for info in [*graph.input, *graph.value_info, *graph.output] if info.type.tensor_type.HasField("shape")}


def _inferred(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """ONNX shape inference on a weightless serialized copy, with `input_shapes` fixed first."""
    with _initializers_as_references(model):
        proto = ir.serde.serialize_model(model)
    for graph_input in proto.graph.input:
        if input_shapes and graph_input.name in input_shapes:
            _set_dims(graph_input, input_shapes[graph_input.name])
    return onnx.shape_inference.infer_shapes(proto, data_prop=True)


def _set_dims(value_info: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = value_info.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise OnnxlrError(f"{{0}} {value_info.name}: {len(dims)} dimensions given, the input has {len(shape.dim)}",
                          "input_shapes")
    for dim, size in zip(shape.dim, dims):
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise OnnxlrError(f"{{0}} {value_info.name}: dimension {dim.dim_value} is fixed, cannot be {size}",
                              "input_shapes")
        dim.Clear()
        dim.dim_value = int(size)


@contextlib.contextmanager
def _initializers_as_references(model: ir.Model) -> Iterator[None]:
    """Swap initializer tensors for external references that are never read (shape inference needs shapes only)."""
    swapped: list[tuple[ir.Value, Any]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                # Integer tensors (shapes, position ids) and tiny ones stay: they feed data propagation.
                if (tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes <= 4096
                        or not tensor.dtype.is_floating_point()):
                    continue
                swapped.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    "__shapes_only__", offset=0, length=tensor.nbytes, dtype=tensor.dtype,
                    shape=cast(ir.Shape, tensor.shape),  # every onnx-ir tensor's shape is an ir.Shape
                    name=tensor.name,  # type: ignore[arg-type]  # onnx-ir annotates str but takes None too
                    base_dir="")
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _collect_shapes(graph: onnx.GraphProto, shapes: dict[str, tuple | None]) -> None:
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    for init in graph.initializer:
        shapes.setdefault(init.name, tuple(init.dims))
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _collect_shapes(sub, shapes)
