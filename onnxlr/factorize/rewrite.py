"""Rewrite: turn each planned weight group into two factor tensors and its nodes into chained pairs.

Groups are taken one at a time in graph order (up to --jobs SVDs at once, results handed back in
order), so the output does not depend on --jobs and memory holds a few layers' working sets. The
rule of each target builds its new nodes; this stage registers the factors (streamed to the
output's data file when there is one), swaps the nodes, then cleans up what became unused and
records the settings and ranks in the model's metadata.

Before IR version 4 every initializer had to be listed as a graph input: there the factors are
main-graph initializers listed as inputs (subgraphs read them from the outer scope), and the
replaced weights leave the inputs with the initializers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Generator
from typing import TYPE_CHECKING, cast

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxlr._version import __version__
from onnxlr.factorize import lowrank, parallel, subnormals
from onnxlr.factorize import plan as planning
from onnxlr.factorize.decisions import Plan
from onnxlr.factorize.groups import WeightGroup
from onnxlr.passes import NameGenerator, Scheme
from onnxlr.passes.base import make_node, old_ir
from onnxlr.policies import LayerPolicy
from onnxlr.settings import Progress, Settings

if TYPE_CHECKING:
    from onnxlr.protocols import WeightSink


def factorize_groups(model: ir.Model, plan: Plan, groups: list[WeightGroup], settings: Settings, progress: Progress,
                     plan_here: bool, dry_run: bool = False, sink: WeightSink | None = None) -> None:
    """SVD, factors and rewrite, one group at a time in graph order (up to --jobs SVDs at once).

    Each group's factors go into the model (written to `sink` right away when there is one) and its
    singular vectors are freed before later groups are taken, so memory holds a few layers' working
    sets, not the model's. `plan_here`: choose each group's scheme and rank in `plan` here too (per-layer policies).
    A group whose factors would take more bytes than its weight stays dense (`no_file_gain`, in `plan`).
    Graph edits stay on this thread, in group order, so names and file layout do not depend on --jobs.
    """
    active = [g for g in groups if not plan[g].reason and plan[g].joint is None]  # joint pairs: onnxlr.coupled.plans
    names = NameGenerator(model)
    existing = {id(v) for graph in model.graphs() for v in graph.initializers.values()} if old_ir(model) else None

    def work(group: WeightGroup) -> tuple[np.ndarray, np.ndarray] | None:
        if plan_here:
            planning.plan_layer(plan, group, settings)
        decision = plan[group]
        if dry_run or decision.reason or decision.rank is None:
            return None
        assert decision.scheme is not None  # planned with its rank
        return plan.svd.factors(group, decision.scheme, decision.rank)

    assert settings.jobs is not None  # Settings fills in the default
    # ordered_map is a generator: closing it stops the work left
    results = cast("Generator[tuple[np.ndarray, np.ndarray] | None, None, None]",
                   parallel.ordered_map(work, active, jobs=settings.jobs,
                                        cost=lambda g: _working_set(plan, g, settings)))
    with contextlib.closing(results):
        for group in progress(active, "SVD"):
            factors = next(results)
            if factors is not None:
                scheme = cast(Scheme, plan[group].scheme)  # factors exist for a planned group
                tensors = FactorTensors(group, scheme, factors)
                if settings.allow_no_gain or tensors.nbytes < _stored_bytes(group):
                    _rewrite_group(group, scheme, tensors, names, sink)
                else:  # the plan said it pays; the bytes say it does not: keep the weight (a planner bug)
                    plan.keep_dense(group, "no_file_gain", f"factors take {tensors.nbytes} bytes, the weight "
                                                           f"{_stored_bytes(group)}: kept dense")
            plan.svd.drop_vectors(group)
    if existing is not None:
        _list_new_initializers(model, existing)


def _list_new_initializers(model: ir.Model, existing: set[int]) -> None:
    """IR < 4: the initializers the rewrite added become main-graph inputs (those made in a subgraph move
    to the main graph, which the subgraph reads as its outer scope: a subgraph lists no initializer)."""
    main = model.graph
    for graph in list(model.graphs()):
        for name, value in list(graph.initializers.items()):
            if id(value) in existing:
                continue
            if graph is not main:
                del graph.initializers[name]
                main.register_initializer(value)
            tensor = value.const_value
            if tensor is not None:  # a graph input declares its type and shape
                value.type = value.type or ir.TensorType(tensor.dtype)
                value.shape = value.shape or ir.Shape(cast("tuple[int, ...]", tensor.shape))  # a constant's: ints
            main.inputs.append(value)


def _working_set(plan: Plan, group: WeightGroup, settings: Settings) -> int:
    """Rough upper estimate of one group's SVD memory, for --jobs scheduling."""
    scheme = plan[group].scheme or group.schemes[0]
    known_rank = plan[group].rank
    per_layer = isinstance(settings.policy, LayerPolicy) and not settings.policy.needs_spectrum
    if known_rank is None and per_layer and len(group.schemes) == 1:
        known_rank = planning.policy_rank(plan, group, scheme, settings)
    return lowrank.working_set_bytes(scheme.matrices.shape, known_rank, settings.svd) * len(group.schemes)


class FactorTensors:
    """Each reader's two factor tensors, from the group's one factor pair, stored once.

    A reader that sees the lead's matrix takes (A, B); one that sees its transpose takes (Bᵀ, Aᵀ).
    Each rule then lays them out as its node reads them (rule.factor_tensors). A tensor equal to
    one already kept is that tensor again, and one equal to its transpose is a Transpose node of
    it (constant-folded by onnxruntime when the session loads): the file holds each factor once.
    """

    def __init__(self, group: WeightGroup, scheme: Scheme, factors: tuple[np.ndarray, np.ndarray]) -> None:
        a, b = factors
        dtype = group.lead.dtype.numpy()
        self.stored: list[np.ndarray] = []  # distinct tensors, in the order they are first needed
        self.readers: list[tuple[tuple[int, bool], tuple[int, bool]]] = []  # per target: (index, transposed) x 2
        for index, (target, flipped) in enumerate(zip(group.targets, group.flipped)):
            pair = (b.transpose(0, 2, 1), a.transpose(0, 2, 1)) if flipped else (a, b)
            first, second = target.rule.factor_tensors(target, group.reader_scheme(index, scheme), *pair)
            self.readers.append((self._keep(first, dtype), self._keep(second, dtype)))

    def _keep(self, array: np.ndarray, dtype: np.dtype) -> tuple[int, bool]:
        array = np.ascontiguousarray(array.astype(dtype))
        for index, kept in enumerate(self.stored):
            if kept.shape == array.shape and np.array_equal(kept, array):
                return index, False
            if kept.ndim == 2 and kept.T.shape == array.shape and np.array_equal(kept.T, array):
                return index, True
        self.stored.append(array)
        return len(self.stored) - 1, False

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.stored)


def _stored_bytes(group: WeightGroup) -> int:
    """Bytes the weight takes in the file: what leaves it when every reader is rewritten."""
    tensor = ir.convenience.get_const_tensor(group.lead.root)
    return int(tensor.nbytes) if tensor is not None else 0


def _rewrite_group(group: WeightGroup, planned: Scheme, tensors: FactorTensors, names: NameGenerator,
                   sink: WeightSink | None) -> None:
    lead = group.lead
    owner = _owning_graph(lead.weight, lead.node)
    base = lead.weight.name or lead.name
    suffixes = ["a", "b"] + [f"f{index}" for index in range(2, len(tensors.stored))]
    values = [add_initializer(owner, names(f"{base}_lr_{suffix}"), array, lead.dtype, sink)
              for suffix, array in zip(suffixes, tensors.stored)]
    transposed: dict[int, ir.Value] = {}

    def value_for(index: int, transpose: bool) -> ir.Value:
        if not transpose:
            return values[index]
        if index not in transposed:
            node = make_node("Transpose", [values[index]], names(f"{values[index].name}_T"),
                             names(f"{values[index].name}_T"), {"perm": [1, 0]})
            if len(owner):  # reads an initializer only: first in the graph keeps it sorted
                owner.insert_before(owner[0], node)
            else:
                owner.append(node)
            transposed[index] = node.outputs[0]
        return transposed[index]

    for index, target in enumerate(group.targets):
        node = target.node
        (first, first_t), (second, second_t) = tensors.readers[index]
        scheme = group.reader_scheme(index, planned)
        assert node.graph is not None  # a node of the model
        new_nodes = target.rule.rewrite(target, scheme, value_for(first, first_t),
                                        value_for(second, second_t), names)
        for position, new_node in enumerate(new_nodes, start=1):
            # Provenance, and which node ends the pair (verify --per-layer compares its output).
            new_node.metadata_props["onnxlr.source"] = node.name or ""
            new_node.metadata_props["onnxlr.pair"] = str(position)
        # The last new node's outputs take the place of the node's, one for one (one output for
        # MatMul/Gemm/Conv; Y, Y_h, Y_c for an LSTM).
        old_outputs = list(node.outputs)
        ir.convenience.replace_nodes_and_values(
            node.graph, node, [node], new_nodes, old_outputs, list(new_nodes[-1].outputs[:len(old_outputs)])
        )


def _owning_graph(weight: ir.Value, node: ir.Node) -> ir.Graph:
    """The graph that defines the weight: every user of it lives there or in a subgraph of it."""
    if weight.graph is not None:
        return weight.graph
    producer = weight.producer()
    if producer is not None and producer.graph is not None:
        return producer.graph
    assert node.graph is not None  # a node of the model
    return node.graph


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType, sink: WeightSink | None = None
                    ) -> ir.Value:
    """Every tensor onnxlr writes comes through here: stored as `dtype`, its subnormals flushed to zero (they run
    many times slower on x86 CPUs; onnxlr.factorize.subnormals), the count kept in the value's meta for the report."""
    stored = np.array(array, dtype=dtype.numpy(), order="C")  # a copy: the caller's array is left as it was
    flushed = subnormals.flush(stored, dtype)
    tensor: ir.TensorProtocol = ir.Tensor(stored, dtype=dtype, name=name)
    if sink is not None:  # straight to the output's data file; the model keeps a reference to it
        tensor = sink.append(tensor)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(dtype))
    if flushed:
        value.meta[subnormals.META_KEY] = flushed
    graph.register_initializer(value)
    return value


def cleanup(model: ir.Model, plan: Plan, groups: list[WeightGroup]) -> None:
    """Remove the nodes and initializers the rewrite left unused (replaced weights, folded chains).

    Initializers listed as graph inputs that were read as weights (IR < 4, --inputs-as-constants)
    and are now unused leave the inputs too; every other input stays."""
    replaced = _replaced_input_weights(plan, groups)
    ir_passes.RemoveUnusedNodesPass()(model)
    for value in replaced:
        graph = value.graph
        if graph is None or value.uses() or value.is_graph_output() or not value.is_graph_input():
            continue
        graph.inputs.remove(value)
        if value.name is not None and value.name in graph.initializers and graph.initializers[value.name] is value:
            del graph.initializers[value.name]
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
                del graph.initializers[name]


def _replaced_input_weights(plan: Plan, groups: list[WeightGroup]) -> list[ir.Value]:
    """The initializers listed as graph inputs that factorized groups read, directly or through a folded chain."""
    found = {id(source): source for group in groups if plan.factorized(group)
             for source in group.lead.sources if source.is_graph_input()}
    return list(found.values())


def record_metadata(model: ir.Model, settings: Settings, plan: Plan, groups: list[WeightGroup]) -> None:
    ranks = {t.name: plan[g].rank for g in groups if plan.factorized(g) for t in g.targets}
    model.metadata_props["onnxlr.version"] = __version__
    model.metadata_props["onnxlr.settings"] = json.dumps(settings.recorded(), sort_keys=True)
    model.metadata_props["onnxlr.ranks"] = json.dumps(ranks, sort_keys=True)
    methods = set()
    for group in groups:
        decision = plan[group]
        decomposition = plan.svd.decompositions(group).get(cast(Scheme, decision.scheme).name) \
            if decision.factorized else None  # factorized: planned
        if decomposition is not None:
            methods.add(decomposition.method)
    joint = {g.lead.name: [len(role.plan.fit.kept), role.plan.pair.width] for g in groups
             if (role := plan[g].joint) is not None}
    if joint:  # kept and total inner neurons of each layer compressed with its coupled partner
        model.metadata_props["onnxlr.joint"] = json.dumps(joint, sort_keys=True)
        methods.add("joint")
    model.metadata_props["onnxlr.methods"] = ",".join(sorted(methods))
