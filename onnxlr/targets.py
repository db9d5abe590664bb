"""Find targets: which nodes a rule can factorize, which weight each reads, and which are left alone (why).

Every node of every graph (subgraphs of If/Loop/Scan included) is offered to the rule of its op
type. Targets that read one weight the same way become one WeightGroup (factorized once); a node
that cannot be handled becomes a SkippedNode with a reason code and a sentence.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from onnxlr.groups import WeightGroup
from onnxlr.passes import LEFT_ALONE, RULES, Context, Skip, Target
from onnxlr.passes.base import FLOAT_TYPES
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
    rules = {op: RULES[op]() for op in settings.ops}
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


def _check_weight(target: Target) -> None:
    if target.dtype not in FLOAT_TYPES:
        raise Skip("dtype", f"weight dtype {target.dtype.name} is not a float type")
    if target.array.size == 0:
        raise Skip("empty_weight", "weight is empty (a zero-sized dimension)")
    if not np.all(np.isfinite(target.array.astype(np.float32, copy=False))):
        raise Skip("non_finite_weight", "weight has NaN or Inf values")


def _group_shared_weights(targets: list[Target], skipped: list[SkippedNode], settings: Settings) -> FoundTargets:
    by_weight: dict[int, list[Target]] = {}
    for target in targets:
        by_weight.setdefault(id(target.weight), []).append(target)
    target_nodes = {id(t.node) for t in targets}
    groups: list[WeightGroup] = []
    for users in by_weight.values():
        weight = users[0].weight
        others = [n for n in weight.consumers() if id(n) not in target_nodes]
        views = {t.view for t in users}
        if others:
            reason = f"weight is also read by {others[0].op_type} node {others[0].name!r}, which cannot be rewritten"
            skipped.extend(SkippedNode(t.node, "shared_with_other_op", reason) for t in users)
            continue
        if len(views) > 1:
            reason = "weight is shared by nodes that read it differently"
            skipped.extend(SkippedNode(t.node, "shared_differently", reason) for t in users)
            continue
        group = WeightGroup(targets=users, solver=settings.solver)
        if users[0].array.size < settings.min_params:
            group.keep_dense("min_params", f"fewer than --min-params {settings.min_params} parameters")
        groups.append(group)
    return FoundTargets(groups, skipped)


def attach_statistics(groups: list[WeightGroup], statistics: Mapping[str, np.ndarray]) -> None:
    """Give each group the sum of its users' Grams (users without statistics add nothing)."""
    for group in groups:
        grams = [statistics[key] for key in (t.node.outputs[0].name for t in group.targets) if key in statistics]
        if grams:
            group.gram = np.sum(grams, axis=0)
