"""Per-layer verification: each factorized layer's new nodes, run on the ORIGINAL layer's input, against the original
layer's output.

The whole-model comparison says how far the outputs moved; this says which layers moved them, each on its own (no
error carried in from earlier layers). It runs while the reference runs in segments (onnxlr.verification.segments hands over each
layer's input and output as their segment makes them), with one small session per layer holding only that layer's
factors, so it never needs either model whole in memory. Per layer: relative error ||Y' - Y|| / ||Y|| and cosine over
every element of the verification samples; `--min-layer-cosine` fails verification below it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxlr.verification.segments import reads, session_beside


@dataclasses.dataclass
class Layer:
    """The candidate's nodes that replaced one original node, and the values they read from the original graph."""

    source: str  # the original node's name
    output: str  # its first output: the name the last new node took over
    inputs: list[str]
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


@dataclasses.dataclass
class Sums:
    """Running sums over the batches: ||Y - Y'||^2, ||Y||^2, ||Y'||^2 and <Y, Y'> (float64)."""

    error: float = 0.0
    reference: float = 0.0
    candidate: float = 0.0
    dot: float = 0.0
    batches: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        y, c = np.asarray(reference, np.float64).ravel(), np.asarray(candidate, np.float64).ravel()
        self.error += float(np.dot(y - c, y - c))
        self.reference += float(np.dot(y, y))
        self.candidate += float(np.dot(c, c))
        self.dot += float(np.dot(y, c))
        self.batches += 1

    def metrics(self) -> dict[str, float]:
        relative = (self.error / self.reference) ** 0.5 if self.reference > 0 else (0.0 if self.error == 0 else 1.0)
        norms = (self.reference * self.candidate) ** 0.5
        cosine = self.dot / norms if norms > 0 else (1.0 if self.error == 0 else 0.0)
        return {"relative_error": relative, "cosine": cosine}


def layers(candidate: onnx.ModelProto, reference: onnx.ModelProto) -> list[Layer]:
    """Every main-graph node the rewrite replaced (its new nodes carry `onnxlr.source`) whose inputs and output the
    reference has too: coupled pairs and heads rewrite two layers at once and are left to the whole-model check."""
    graph = candidate.graph
    initializers = {t.name: t for t in graph.initializer}
    produced_by = {o: node for node in graph.node for o in node.output}
    metadata = {id(node): {p.key: p.value for p in node.metadata_props} for node in graph.node}
    # (original node's name, position among its new nodes): unnamed originals' pairs stay apart by position.
    source_of = {id(node): (meta.get("onnxlr.source", ""), int(meta["onnxlr.pair"])) for node in graph.node
                 if "onnxlr.pair" in (meta := metadata[id(node)]) and meta["onnxlr.pair"].isdigit()}
    pair_nodes = [node for node in graph.node if id(node) in source_of]
    read_by_pair = {(name, source_of[id(node)][0]) for node in pair_nodes for name in node.input
                    if source_of[id(node)][1] > 1}
    known = {v.name for v in reference.graph.input} | {o for n in reference.graph.node for o in n.output}
    found = []
    for end in pair_nodes:
        source = source_of[id(end)][0]
        if any((o, source) in read_by_pair for o in end.output):
            continue  # not the last node of its pair
        nodes = _with_factor_transposes(_chain(end, produced_by, source_of), produced_by, initializers)
        made = {o for n in nodes for o in n.output}
        inputs = sorted(set().union(*(reads(n) for n in nodes)) - made - set(initializers))
        output = end.output[0]
        if not inputs or output not in known or not set(inputs) <= known:
            continue
        used = set().union(*(reads(n) for n in nodes))
        found.append(Layer(source or output, output, inputs, nodes,
                           [initializers[n] for n in sorted(used & set(initializers))]))
    return found


def _chain(end: onnx.NodeProto, produced_by: Mapping[str, onnx.NodeProto],
           source_of: Mapping[int, tuple[str, int]]) -> list[onnx.NodeProto]:
    """`end` and the new nodes of the same original node before it (positions counting down to 1), in order."""
    nodes = [end]
    while source_of[id(nodes[0])][1] > 1:
        source, position = source_of[id(nodes[0])]
        before = [produced_by[name] for name in nodes[0].input if name in produced_by
                  and source_of.get(id(produced_by[name])) == (source, position - 1)]
        if not before:
            break
        nodes.insert(0, before[0])
    return nodes


def _with_factor_transposes(nodes: list[onnx.NodeProto], produced_by: Mapping[str, onnx.NodeProto],
                            initializers: Mapping[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """The pair's nodes, preceded by the Transposes of shared factors they read (nodes of initializers only)."""
    extra = []
    for node in nodes:
        for name in node.input:
            producer = produced_by.get(name)
            if producer is not None and producer not in nodes and producer not in extra and producer.input and all(
                    i in initializers for i in producer.input):
                extra.append(producer)
    return extra + nodes


def layer_model(candidate: onnx.ModelProto, layer: Layer, types: Mapping[str, onnx.ValueInfoProto]) -> bytes:
    """The layer's new nodes as a model: the original's values in, the original node's output out."""
    def info(name: str) -> onnx.ValueInfoProto:
        return types.get(name) or onnx.ValueInfoProto(name=name)

    graph = onnx.helper.make_graph(layer.nodes, "onnxlr_layer", [info(n) for n in layer.inputs],
                                   [onnx.ValueInfoProto(name=layer.output)], layer.initializers)
    model = onnx.helper.make_model(graph, opset_imports=candidate.opset_import, ir_version=candidate.ir_version)
    return model.SerializeToString()


class LayerCheck:
    """Collects the per-layer metrics as the reference runs: `watched` names the values to observe, `take` is the
    segment runner's `on_value`."""

    def __init__(self, candidate_path: str | os.PathLike, reference: onnx.ModelProto, batches: int,
                 types: Mapping[str, onnx.ValueInfoProto], provider: str = "cpu", threads: int = 0,
                 candidate_model: onnx.ModelProto | None = None):
        """`candidate_model`: the candidate's structure when it is not to be read from `candidate_path`."""
        self.path = Path(candidate_path)
        self.candidate = candidate_model if candidate_model is not None else onnx.load(
            str(candidate_path), load_external_data=False)
        self.layers = layers(self.candidate, reference)
        self.batches, self.types, self.provider, self.threads = batches, types, provider, threads
        self.sums = {layer.output: Sums() for layer in self.layers}
        self.errors: dict[str, str] = {}  # layer output -> why its nodes failed (the candidate is at fault)
        self.sessions: dict[str, Any] = {}
        self.held: list[dict[str, np.ndarray]] = [{} for _ in range(batches)]
        self.readers: dict[str, list[Layer]] = {}
        for layer in self.layers:
            for name in [*layer.inputs, layer.output]:
                self.readers.setdefault(name, []).append(layer)

    @property
    def watched(self) -> list[str]:
        return list(self.readers)

    def take(self, batch: int, name: str, array: np.ndarray) -> None:
        held = self.held[batch]
        held[name] = array
        for layer in self.readers.get(name, []):
            if all(n in held for n in [*layer.inputs, layer.output]) and self.sums[layer.output].batches == batch:
                self._check(layer, batch)
        for key in [k for k in held if all(self.sums[r.output].batches > batch for r in self.readers[k])]:
            del held[key]  # every layer that reads it has taken this batch

    def _check(self, layer: Layer, batch: int) -> None:
        held = self.held[batch]
        if layer.output not in self.errors:
            try:
                session = self.sessions.get(layer.output)
                if session is None:
                    session = session_beside(self.path, layer_model(self.candidate, layer, self.types),
                                             self.provider, self.threads)
                    self.sessions[layer.output] = session
                (output,) = session.run([layer.output], {name: held[name] for name in layer.inputs})
                self.sums[layer.output].add(held[layer.output], output)
            except MemoryError:
                raise
            except Exception as exc:  # the reference made these inputs: the candidate's nodes are at fault
                from onnxlr.verification.runtime import error_text

                self.errors[layer.output] = error_text(exc)
                self.sessions.pop(layer.output, None)
        if layer.output in self.errors:
            self.sums[layer.output].batches += 1  # counted as taken, so the values it held are let go
        if self.sums[layer.output].batches == self.batches:
            self.sessions.pop(layer.output, None)  # one layer's factors in memory at a time, give or take a segment

    def results(self, min_cosine: float | None = None) -> list[dict[str, Any]]:
        """Per layer, the worst (lowest cosine) first; `passed` against `min_cosine` (None: not gated)."""
        rows: list[dict[str, Any]] = []
        for layer in self.layers:
            sums = self.sums[layer.output]
            if layer.output in self.errors:
                rows.append({"layer": layer.source, "output": layer.output, "relative_error": None, "cosine": None,
                             "passed": False, "gated": True, "error": self.errors[layer.output]})
                continue
            if sums.batches == 0:
                continue
            metrics = sums.metrics()
            passed = min_cosine is None or metrics["cosine"] >= min_cosine
            rows.append({"layer": layer.source, "output": layer.output, **metrics, "passed": passed,
                         "gated": min_cosine is not None})
        return sorted(rows, key=lambda row: -2.0 if row["cosine"] is None else row["cosine"])  # failed runs first


def summary_failures(rows: Sequence[Mapping[str, Any]], min_cosine: float | None, provider: str) -> list[str]:
    """A line for the layers whose new nodes failed to run, and one for those under `min_cosine` (5 named each)."""
    lines = []
    broken = [row for row in rows if row.get("error")]
    if broken:
        lines.append(f"{len(broken)} factorized layer(s) fail on {provider}: "
                     + "; ".join(f"{row['layer']}: {row['error']}" for row in broken[:5]))
    failing = [row for row in rows if not row["passed"] and not row.get("error")]
    if failing:
        named = ", ".join(f"{row['layer']} {row['cosine']:.4f}" for row in failing[:5])
        more = f" and {len(failing) - 5} more" if len(failing) > 5 else ""
        lines.append(f"{len(failing)} layer(s) on {provider} under --min-layer-cosine {min_cosine:g}: {named}{more}")
    return lines
