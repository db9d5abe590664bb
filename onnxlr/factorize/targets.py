"""Find targets: which nodes a rule can factorize, which weight each reads, and which are left alone (why).

Every node of every graph (subgraphs of If/Loop/Scan included) is offered to the rule of its op
type. Targets that read one weight the same way become one WeightGroup (factorized once); a node
that cannot be handled becomes a SkippedNode with a reason code and a sentence.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import NamedTuple, cast

import numpy as np
import onnx_ir as ir

from onnxlr.factorize.groups import WeightGroup
from onnxlr.factorize.svd import Statistics
from onnxlr.passes import LEFT_ALONE, READER_RULES, RULES, Context, Skip, Target
from onnxlr.passes.base import FLOAT_TYPES
from onnxlr.passes.gather import is_table_lookup
from onnxlr.passes.weights import FOLDABLE
from onnxlr.settings import Settings


@dataclasses.dataclass
class SkippedNode:
    """A node left as it is, before any planning: the reason's stable code and its sentence."""

    node: ir.Node
    code: str
    reason: str


class FoundTargets(NamedTuple):
    groups: list[WeightGroup]
    skipped: list[SkippedNode]


def find_targets(model: ir.Model, settings: Settings, context: Context) -> FoundTargets:
    """Ask each node's rule whether it is a target; group targets by the weight they read."""
    rules = {op: (RULES.get(op) or READER_RULES[op])() for op in settings.ops}
    targets: list[Target] = []
    skipped: list[SkippedNode] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in LEFT_ALONE:
            skipped.append(SkippedNode(node, *LEFT_ALONE[node.op_type]))
            continue
        if node.op_type not in rules:
            continue
        if node.op_type in READER_RULES and not is_table_lookup(node, context):
            continue  # a Gather of a shape, of indices, of a 1-D table: not a candidate
        try:
            _check_filters(node, settings)
            target = rules[node.op_type].match(node, context)
            _check_weight(target)
        except Skip as skip:
            skipped.append(SkippedNode(node, skip.code, skip.message))
            continue
        targets.append(target)
    return _group_shared_weights(targets, skipped, settings)


def _check_filters(node: ir.Node, settings: Settings) -> None:
    name = node.name or ""
    if settings.include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.include):
        raise Skip("not_included", "not matched by --include")
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.exclude):
        raise Skip("excluded", "matched by --exclude")


def selected(name: str, settings: Settings) -> bool:
    """Whether --include/--exclude leave a node of this name to factorize."""
    try:
        _check_filters(ir.Node("", "Identity", [], name=name), settings)
    except Skip:
        return False
    return True


def _check_weight(target: Target) -> None:
    if target.dtype not in FLOAT_TYPES:
        raise Skip("dtype", f"weight dtype {target.dtype.name} is not a float type")
    if target.array.size == 0:
        raise Skip("empty_weight", "weight is empty (a zero-sized dimension)")
    if not np.all(np.isfinite(target.array.astype(np.float32, copy=False))):
        raise Skip("non_finite_weight", "weight has NaN or Inf values")


def _group_shared_weights(targets: list[Target], skipped: list[SkippedNode], settings: Settings) -> FoundTargets:
    """One group per stored weight: every reader of it, through any chain of pure views, or all of them skipped.

    Identity, Transpose, Cast and Reshape of a constant are views of it (exporters dedup shared
    parameters with Identity; a tied head reads Transpose(embedding)). A weight leaves the model only
    when no reader keeps it, so its readers are factorized together with one factor pair or not at all.
    """
    by_root: dict[int, list[Target]] = {}
    for target in targets:
        by_root.setdefault(id(target.root), []).append(target)
    by_node = {id(t.node): t for t in targets}
    left_alone = {id(item.node): item for item in skipped}
    groups: list[WeightGroup] = []
    for users in by_root.values():
        readers, blocker = _readers(users[0].root, by_node, left_alone, users[0].context, settings)
        if blocker is None:
            readers, flipped, blocker = _orient(readers)
        if blocker is not None:
            skipped.extend(SkippedNode(t.node, *blocker) for t in users)
            continue
        groups.append(WeightGroup.of(readers, flipped, _excluded(users[0].array.size, settings)))
    return FoundTargets(groups, skipped)


def _excluded(params: int, settings: Settings) -> tuple[str, str] | None:
    """Why selection keeps a weight dense (code, sentence), if it does."""
    if settings.quantize == "auto":
        return "precision_planned", "--quantize auto plans its precision and correction rank instead"
    if params < settings.min_params:
        return "min_params", f"fewer than --min-params {settings.min_params} parameters"
    return None


def _readers(root: ir.Value, by_node: dict[int, Target], left_alone: dict[int, SkippedNode], context: Context,
             settings: Settings) -> tuple[list[Target], tuple[str, str] | None]:
    """Every node that reads `root` through pure views (in graph order of discovery), or why the weight must stay."""
    readers: list[Target] = []
    pending, seen = [root], set()
    while pending:
        value = pending.pop(0)
        if value.is_graph_output():
            return [], ("graph_output", "weight is also a graph output" + ("" if value is root else " (through a view)"))
        for node, index in value.uses():
            if id(node) in seen:
                continue
            if node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and index == 0:
                seen.add(id(node))
                pending.append(node.outputs[0])
                continue
            target = by_node.get(id(node))
            if target is not None and target.weight is value:
                readers.append(target)
            elif node.op_type in READER_RULES and node.domain in ("", "ai.onnx") and index == 0:
                try:
                    _check_filters(node, settings)  # --exclude on the embedding's Gather keeps the table
                    readers.append(READER_RULES[node.op_type]().match(node, context))
                except Skip as skip:
                    return [], ("shared_with_other_op", f"weight is also read by {node.op_type} node {node.name!r}: "
                                                        f"{skip.message}")
            else:
                why = f" ({left_alone[id(node)].reason})" if id(node) in left_alone else ", which cannot be rewritten"
                return [], ("shared_with_other_op", f"weight is also read by {node.op_type} node {node.name!r}{why}")
            seen.add(id(node))
    return readers, None


def _orient(readers: list[Target]) -> tuple[list[Target], list[bool], tuple[str, str] | None]:
    """Put a target first (its schemes are the group's) and say which readers see the transpose of its matrix.

    Readers share one factor pair when each sees the lead's weight the same way (the same rule and
    view, and the same values), or, for plain matrices (MatMul, Gemm, Gather), that matrix or its
    transpose (W ≈ A·B, so Wᵀ ≈ Bᵀ·Aᵀ)."""
    readers = sorted(readers, key=lambda t: t.rule.op_type in READER_RULES)  # stable: a target leads
    lead = readers[0]
    lead_matrix = lead.rule.matrix(lead)
    flipped = []
    for reader in readers:
        if reader.dtype != lead.dtype:
            return [], [], ("shared_differently", "weight is shared by nodes that read it in different dtypes")
        if type(reader.rule) is type(lead.rule) and reader.view == lead.view and _same(reader.array, lead.array):
            flipped.append(False)
            continue
        matrix = reader.rule.matrix(reader)
        if matrix is not None and lead_matrix is not None and _same(matrix, lead_matrix):
            flipped.append(False)
        elif matrix is not None and lead_matrix is not None and _same(matrix, lead_matrix.T):
            flipped.append(True)
        else:
            return [], [], ("shared_differently", "weight is shared by nodes that read it differently")
    return readers, flipped, None


def _same(first: np.ndarray, second: np.ndarray) -> bool:
    return first is second or (first.shape == second.shape and np.array_equal(first, second))


def attach_statistics(groups: list[WeightGroup], statistics: Mapping[str, np.ndarray]) -> dict[int, Statistics]:
    """Each group's statistics (by id): the sum of its users' Grams (users without statistics add nothing)."""
    found = {}
    for group in groups:
        grams = [statistics[cast(str, key)] for key in (t.node.outputs[0].name for t in group.targets)
                 if key in statistics]  # a key in statistics is a name
        if grams:
            found[id(group)] = Statistics(gram=np.sum(grams, axis=0))
    return found
