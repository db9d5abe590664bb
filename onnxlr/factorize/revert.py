"""Put rewritten layers back as they were: the original node in place of its factor pair, a narrowed pair's original
weights in place of its slices (what onnxlr.timing.confirm does with a layer that does not pay in the whole model).

A layer is named by its original node's name: the factor pair's nodes carry it as metadata `onnxlr.source`, and the
nodes a joint pair narrowed keep their names and carry the pair's key as `onnxlr.joint_unit` (a joint pair is put
back whole: its layers' shapes depend on each other). The original's constants come from the original model (onnx-ir
form, not modified) and are added as initializers when the rewritten model no longer holds them; the metadata that
lists ranks and joint layers is updated. No SVD is run again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import cast

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxlr.passes.base import old_ir
from onnxlr.passes.weights import constant_weight

logger = logging.getLogger(__name__)

SOURCE, POSITION = "onnxlr.source", "onnxlr.pair"  # node metadata written by onnxlr.factorize.rewrite
JOINT_UNIT = "onnxlr.joint_unit"  # node metadata written by onnxlr.coupled.plans.rewrite


def rewritten_layers(model: ir.Model) -> set[str]:
    """The original node names of every layer rewritten in `model` (factor pairs and jointly narrowed layers)."""
    names = {node.metadata_props[SOURCE] for node in _nodes(model) if node.metadata_props.get(SOURCE)}
    return names | set(json.loads(model.metadata_props.get("onnxlr.joint", "{}")))


def units(model: ir.Model) -> dict[str, str]:
    """Each rewritten layer's unit, what is put back together: a joint pair's layers, and the readers of one shared
    weight (their pairs read the same factors: putting one reader back alone would store the weight beside its
    factors). Each unit is named by its first layer in sorted order."""
    parent = {name: name for name in rewritten_layers(model)}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(first: str, second: str) -> None:
        a, b = find(first), find(second)
        if a != b:
            parent[max(a, b)] = min(a, b)

    owners: dict[int | str, str] = {}  # a factor value (or a joint pair's key) -> the first layer seen with it
    for node in _nodes(model):
        layer = node.metadata_props.get(SOURCE)
        keys: list[int | str] = [id(value) for value in _factor_values(node)] if layer in parent else []
        if node.metadata_props.get(JOINT_UNIT) and node.name in parent:
            layer, keys = node.name, [node.metadata_props[JOINT_UNIT]]
        for key in keys:
            assert layer is not None  # keys are found only for a layer in `parent`
            join(owners.setdefault(key, layer), layer)
    return {name: find(name) for name in parent}


def _factor_values(node: ir.Node) -> list[ir.Value]:
    """The factors a pair node reads, seen through a Transpose of one (a reader of a shared weight's factors)."""
    found = []
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "Transpose":
            value = producer.inputs[0]
        if value is not None and value.const_value is not None and "_lr_" in (value.name or ""):
            found.append(value)  # a factor (onnxlr.factorize.rewrite names them WEIGHT_lr_a, ...), not a bias
    return found


def revert_layers(model: ir.Model, original: ir.Model, names: Iterable[str]) -> list[str]:
    """Revert the layers `names` in `model`, in place (a joint layer takes its partner with it); returns the
    layers reverted, partners included. A layer whose original node cannot be found is left as it is (logged)."""
    wanted = set(names)
    if not wanted:
        return []
    layers = rewritten_layers(model)
    originals = {node.name: node for node in _nodes(original) if node.name}
    values = _values_by_name(model)
    pairs: dict[str, list[ir.Node]] = {}
    units: set[str] = set()
    for node in _nodes(model):
        source = node.metadata_props.get(SOURCE)
        if source in wanted:
            pairs.setdefault(source, []).append(node)
        if node.name in wanted and node.metadata_props.get(JOINT_UNIT):
            units.add(node.metadata_props[JOINT_UNIT])
    done = []
    for name, nodes in pairs.items():
        if name not in originals:
            logger.warning("cannot revert %s: no node of that name in the original", name)
            continue
        _restore_node(model, originals[name], nodes, values)
        done.append(name)
    for node in [n for n in _nodes(model) if n.metadata_props.get(JOINT_UNIT) in units]:
        old = originals.get(node.name or "")
        if old is None:
            logger.warning("cannot revert %s: no node of that name in the original", node.name)
            continue
        for index, (value, before) in enumerate(zip(node.inputs, old.inputs)):
            if value is not None and before is not None and value.name != before.name:
                node.replace_input_with(index, _value_for(before, values, model))
        del node.metadata_props[JOINT_UNIT]
        if node.name in layers:  # a BatchNormalization narrowed with its conv is no layer of the report
            done.append(node.name)
    model.graph.sort()  # restored weight chains were appended: before their readers now
    _remove_unused(model, original)
    _update_metadata(model, set(done))
    return done


def _nodes(model: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for graph in model.graphs():
        for value in [*graph.inputs, *graph.initializers.values()]:
            values.setdefault(value.name or "", value)
        for node in graph:
            for value in node.outputs:
                values.setdefault(value.name or "", value)
    return values


def _restore_node(model: ir.Model, old: ir.Node, pair: list[ir.Node], values: dict[str, ir.Value]) -> None:
    """The original node in place of its pair (the pair's last node's outputs become the node's, names kept)."""
    pair.sort(key=lambda node: int(node.metadata_props.get(POSITION, "0")))
    inputs = [None if value is None else _value_for(value, values, model) for value in old.inputs]
    clone = ir.Node(old.domain, old.op_type, inputs, attributes=list(old.attributes.values()),
                    num_outputs=len(old.outputs), name=old.name, overload=old.overload, version=old.version)
    outputs = list(pair[-1].outputs[: len(old.outputs)])
    assert pair[0].graph is not None  # the pair is in the model
    ir.convenience.replace_nodes_and_values(pair[0].graph, pair[0], pair, [clone], outputs, list(clone.outputs))
    for new, before in zip(clone.outputs, old.outputs):
        new.name = before.name
        values[new.name or ""] = new  # the pair's outputs are the restored node's now


def _value_for(before: ir.Value, values: dict[str, ir.Value], model: ir.Model) -> ir.Value:
    """The rewritten model's value of that name, else the original's way of making it, in the main graph (every
    subgraph sees it as its outer scope): its initializer, or the nodes (Identity, Transpose, ...) that compute it
    from one, copied, so a weight shared through them is stored once as in the original; a Constant node's value
    becomes an initializer of the same bytes."""
    found = values.get(before.name or "")
    if found is not None:
        return found
    producer = before.producer()
    if before.const_value is None and producer is not None and producer.op_type != "Constant":
        inputs = [None if value is None else _value_for(value, values, model) for value in producer.inputs]
        clone = ir.Node(producer.domain, producer.op_type, inputs, attributes=list(producer.attributes.values()),
                        num_outputs=len(producer.outputs), name=producer.name, overload=producer.overload,
                        version=producer.version)
        model.graph.append(clone)  # revert_layers sorts the graph once every value is in place
        for new, old in zip(clone.outputs, producer.outputs):
            new.name = old.name
            values[new.name or ""] = new
        return clone.outputs[list(producer.outputs).index(before)]
    weight = constant_weight(before, inputs_as_constants=True)
    if weight.array is None:
        raise RuntimeError(f"cannot revert: {before.name!r} is neither in the rewritten model nor a constant")
    tensor = before.const_value if before.const_value is not None else ir.Tensor(weight.array, name=before.name)
    value = ir.Value(name=before.name, const_value=tensor, shape=ir.Shape(cast(ir.Shape, tensor.shape)),
                     type=ir.TensorType(tensor.dtype))
    model.graph.register_initializer(value)
    if old_ir(model):
        model.graph.inputs.append(value)
    values[value.name or ""] = value
    return value


def _remove_unused(model: ir.Model, original: ir.Model) -> None:
    """The pair nodes' factors and Transposes that nothing reads now (IR < 4: and their graph-input listing)."""
    ir_passes.RemoveUnusedNodesPass()(model)
    listed_before = {value.name for value in original.graph.inputs}
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if value.uses() or value.is_graph_output():
                continue
            if value.is_graph_input():
                if name in listed_before:
                    continue
                graph.inputs.remove(value)
            del graph.initializers[name]


def _update_metadata(model: ir.Model, reverted: set[str]) -> None:
    for key in ("onnxlr.ranks", "onnxlr.joint"):
        if key in model.metadata_props:
            recorded = json.loads(model.metadata_props[key])
            kept = {name: value for name, value in recorded.items() if name not in reverted}
            if kept:
                model.metadata_props[key] = json.dumps(kept, sort_keys=True)
            else:
                del model.metadata_props[key]
