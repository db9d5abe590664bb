"""Run a model larger than memory in pieces: consecutive segments of its main graph, one onnxruntime session at a time.

The model's structure is read without its weights; each segment is a model of a run of consecutive nodes whose
weights stay references into the original's external-data file (onnxruntime reads only that segment's bytes), its
inputs the values earlier segments (or the caller) produced, its outputs the values later segments or the caller
need. Segments run in order, each over every batch before the next starts, so memory holds one segment's weights
and the values crossing the cut, never the whole model: what verification of a large model, and calibration of one
that does not fit, use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError


@dataclasses.dataclass
class Segment:
    nodes: list[onnx.NodeProto]
    inputs: list[str]  # values it reads that it does not make (graph inputs or earlier segments' outputs)
    outputs: list[str]  # values it makes that later segments, or the caller, read
    weight_bytes: int


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer, its data loaded or not (an external reference's `length`, else dims x itemsize)."""
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def reads(node: onnx.NodeProto) -> set[str]:
    """Every value a node reads: its inputs and what its subgraphs read from the outer scope."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            inner = set().union(*(reads(n) for n in graph.node)) if len(graph.node) else set()
            made = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
            made |= {t.name for t in graph.initializer}
            names |= inner - made
    return names


def plan(graph: onnx.GraphProto, budget_bytes: int, wanted: Sequence[str]) -> list[Segment]:
    """Cut the main graph (in its order) into runs of nodes whose weights take at most `budget_bytes` each (a node
    larger than that alone is one segment); `wanted`: values the caller reads after the run (the outputs)."""
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    groups: list[list[onnx.NodeProto]] = [[]]
    held: set[str] = set()
    total = 0
    def cost_of(node: onnx.NodeProto, new: set[str]) -> int:
        return sum(sizes[name] for name in new) + sum(tensor_bytes(a.t) for a in node.attribute if a.HasField("t"))

    for node in graph.node:
        new = {name for name in reads(node) if name in sizes} - held
        cost = cost_of(node, new)
        if groups[-1] and total + cost > budget_bytes:
            groups.append([])
            held, total = set(), 0
            new = {name for name in reads(node) if name in sizes}
            cost = cost_of(node, new)
        groups[-1].append(node)
        held |= new
        total += cost
    read_later: list[set[str]] = [set(wanted)]
    for nodes in reversed(groups[1:]):
        read_later.insert(0, read_later[0] | set().union(*(reads(n) for n in nodes)))
    segments = []
    for nodes, later in zip(groups, read_later):
        made = [o for n in nodes for o in n.output if o]
        needed = set().union(*(reads(n) for n in nodes)) - set(made) - set(sizes)
        weights = {name for n in nodes for name in reads(n) if name in sizes}
        segments.append(Segment(nodes=nodes, inputs=sorted(needed), outputs=[o for o in made if o in later],
                                weight_bytes=sum(sizes[name] for name in weights)))
    return segments


def segment_model(model: onnx.ModelProto, segment: Segment, types: Mapping[str, onnx.ValueInfoProto]) -> bytes:
    """The segment as a serialized model: its nodes, the initializers they read (external references kept)."""
    def info(name: str) -> onnx.ValueInfoProto:
        if name not in types:
            raise OnnxlrError(f"cannot run the model in segments: the type of {name!r} is unknown to shape inference")
        return types[name]

    used = set().union(*(reads(n) for n in segment.nodes)) if segment.nodes else set()
    graph = onnx.helper.make_graph(
        segment.nodes, "onnxlr_segment", [info(n) for n in segment.inputs], [info(n) for n in segment.outputs],
        [t for t in model.graph.initializer if t.name in used])
    piece = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return piece.SerializeToString()


def value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type of every main-graph value: declared, or from ONNX shape inference (no weights are read)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            found[info.name] = info
    return found


def run_in_segments(path: str | os.PathLike, batches: Sequence[Mapping[str, np.ndarray]], output_names: Sequence[str],
                    budget_bytes: int, provider: str = "cpu", threads: int = 0,
                    structure: onnx.ModelProto | None = None, observe: Sequence[str] = (),
                    on_value: Callable[[int, str, np.ndarray], None] | None = None) -> list[dict[str, np.ndarray]]:
    """Run the model at `path` on every batch, one segment (of at most `budget_bytes` of weights) at a time; returns
    each batch's `output_names`.

    `structure`: the graph to run instead of the file's own (the same weights, e.g. with extra nodes); its external
    data is read next to `path`. `observe`: values handed to `on_value(batch index, name, array)` as soon as a segment
    makes them (graph inputs at the start), then dropped unless something later reads them: calibration statistics
    collected block by block."""
    model = structure if structure is not None else onnx.load(str(path), load_external_data=False)
    segments = plan(model.graph, budget_bytes, [*output_names, *observe])
    types = value_types(model)
    carried = [dict(batch) for batch in batches]
    watched = set(observe)
    for index, values in enumerate(carried):
        for name in watched.intersection(values):
            assert on_value is not None  # `observe` comes with `on_value`
            on_value(index, name, values[name])
    for index, segment in enumerate(segments):
        if not segment.nodes or not segment.outputs:  # nothing later, and nothing watched, needs what it makes
            continue
        session = session_beside(Path(path), segment_model(model, segment, types), provider, threads)
        for number, values in enumerate(carried):
            produced = session.run(segment.outputs, {name: values[name] for name in segment.inputs})
            values.update(zip(segment.outputs, produced))
            for name in watched.intersection(segment.outputs):
                assert on_value is not None
                on_value(number, name, values[name])
        del session
        still_read = set(output_names).union(*(set(s.inputs) for s in segments[index + 1:]))
        for values in carried:
            for name in [n for n in values if n not in still_read]:
                del values[name]
    return [{name: values[name] for name in output_names} for values in carried]


def session_beside(path: Path, piece: bytes, provider: str, threads: int):
    """A session of a segment written (a few kB: its weights are references) next to the model, where onnxruntime
    resolves the external data's relative locations; the file is gone once the session has read it."""
    import tempfile

    from onnxlr.verification.runtime import make_session

    try:
        handle, name = tempfile.mkstemp(prefix=".onnxlr-segment-", suffix=".onnx", dir=path.resolve().parent)
    except OSError as exc:
        raise OnnxlrError(f"cannot run the model in segments: cannot write next to {path}: {exc}") from exc
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(piece)
        return make_session(name, provider, threads, prepack=False)  # run a few times: packing would not pay
    finally:
        os.unlink(name)
