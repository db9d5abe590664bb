"""The joint stage of the pipeline (`--methods svd,joint`): coupled MLP pairs keep k of their D inner neurons.

For each coupled pair (onnxlr.pairs: linear -> elementwise activation -> linear) whose two weights
are factorization targets of their own, the per-matrix plan gives the pair some number of weight
parameters. At the same number, joint compression keeps k neurons: the first weight's columns and
bias entries, and the second weight refitted by least squares on the calibration activations
(onnxlr.joint). Both are measured on the calibration data, as the output error of the pair's second
layer (the per-matrix one with the first layer's product fed in its place), and the pair takes
whichever loses less. Keeping k neurons only slices and replaces initializers: no node is added.

Joint pairs need calibration data (the refit needs the activations). `--target-cosine`,
`--target-error` and `--compensate` do not take joint pairs yet.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxlr import datafit, joint, pairs
from onnxlr.errors import OnnxlrError
from onnxlr.groups import WeightGroup
from onnxlr.passes import NameGenerator
from onnxlr.rewrite import add_initializer
from onnxlr.settings import Progress, Settings

logger = logging.getLogger(__name__)

# The pair's output error is compared on the first calibration samples (as sensitivity is).
COMPARISON_SAMPLES = 64


@dataclasses.dataclass
class PairPlan:
    """A coupled pair, the weight groups of its two layers, and (once chosen) its joint fit."""

    pair: pairs.MlpPair
    up: WeightGroup
    down: WeightGroup
    fit: joint.JointFit | None = None
    svd_error: float | None = None  # output error of the pair's second layer under the per-matrix plan
    joint_error: float | None = None  # and under the joint fit at the same weight parameters

    @property
    def chosen(self) -> bool:
        return self.fit is not None

    @property
    def key(self) -> str:
        """The calibration probe of the second layer: it reads the activation the refit needs."""
        return self.down.lead.node.outputs[0].name


@dataclasses.dataclass(frozen=True)
class JointRole:
    """What a WeightGroup of a chosen pair shows in its report row."""

    plan: PairPlan
    side: str  # "up" or "down"

    @property
    def partner(self) -> str:
        other = self.plan.down if self.side == "up" else self.plan.up
        return other.lead.name


def check_settings(settings: Settings) -> None:
    for name in ("target_cosine", "target_error"):
        if getattr(settings, name) is not None:
            raise OnnxlrError("{0} joint does not take {1} yet: use a per-layer policy or {2}", "methods", name,
                              "param_budget")
    if settings.compensate:
        raise OnnxlrError("{0} joint does not take {1} yet", "methods", "compensate")


def find(model: ir.Model, groups: Sequence[WeightGroup]) -> list[PairPlan]:
    """The coupled pairs whose two weights are each one group's only reader (plain, unshared weights)."""
    by_node = {id(g.lead.node): g for g in groups if len(g.targets) == 1 and not g.reason}
    found, _ = pairs.find_mlp_pairs(model)
    plans = []
    for pair in found:
        up, down = by_node.get(id(pair.up.node)), by_node.get(id(pair.down.node))
        if up is not None and down is not None and up.lead.weight is pair.up.weight and \
                down.lead.weight is pair.down.weight:
            plans.append(PairPlan(pair, up, down))
    return plans


def choose(plans: list[PairPlan], runner: Any, batches: list[dict[str, np.ndarray]], progress: Progress) -> None:
    """Fit each pair jointly at its per-matrix plan's weight parameters; keep the fit where it loses less."""
    plans = [p for p in plans if p.up.slot is not None and p.down.slot is not None and p.key in runner.probes
             and (p.up.factorized or p.down.factorized)]
    if not plans:
        return
    correlations = _correlations(plans, runner, batches, progress)
    comparison = datafit.first_samples(batches, COMPARISON_SAMPLES)
    for plan in progress(plans, "joint pairs"):
        width = plan.pair.width
        keep = joint.keep_for_params(plan.pair.up.matrix().shape[0], width, plan.pair.down.matrix().shape[1],
                                     _weight_params_after(plan.up) + _weight_params_after(plan.down),
                                     up_bias=False, down_bias=False)
        if keep >= width:
            continue
        fit = joint.select_and_refit(plan.pair.down.matrix(), plan.pair.down.bias_array(), correlations[id(plan)], keep)
        plan.svd_error, plan.joint_error = _errors(plan, fit, runner, comparison)
        if plan.joint_error < plan.svd_error:
            plan.fit = fit
            for group, side in ((plan.up, "up"), (plan.down, "down")):
                group.joint = JointRole(plan, side)
    chosen = sum(p.chosen for p in plans)
    logger.info("joint pairs: %d of %d chosen over per-matrix factorization", chosen, len(plans))


def _weight_params_after(group: WeightGroup) -> int:
    """The group's weight parameters under the per-matrix plan (the bias left out: it stays either way)."""
    scheme = group.scheme or group.schemes[0]
    if group.factorized:
        return group.rank * scheme.params_per_rank
    return scheme.params_before - scheme.fixed_params


def _correlations(plans: list[PairPlan], runner: Any, batches: list[dict[str, np.ndarray]], progress: Progress
                  ) -> dict[int, np.ndarray]:
    grams = {id(p): joint.AugmentedGram() for p in plans}
    names = [runner.probes[p.key].activation for p in plans]
    for batch in progress(batches, "joint statistics"):
        outputs = runner.run(batch, names)
        keep = runner.keep(batch)
        for plan in plans:
            grams[id(plan)].add(runner.vectors(plan.key, outputs, keep))
    return {key: gram.result() for key, gram in grams.items()}


def _errors(plan: PairPlan, fit: joint.JointFit, runner: Any, batches: list[dict[str, np.ndarray]]
            ) -> tuple[float, float]:
    """Relative output error of the pair's second layer: per-matrix plan, and joint fit (same samples)."""
    down_matrix = plan.pair.down.matrix().astype(np.float64)
    down_bias = plan.pair.down.bias_array()
    bias = np.zeros(down_matrix.shape[1]) if down_bias is None else down_bias.astype(np.float64)
    svd_down = _planned_matrix(plan.down, plan.pair.down) if plan.down.factorized else down_matrix
    overrides = {plan.up.slot: plan.up.dense_weight(plan.up.scheme, plan.up.rank)} if plan.up.factorized else {}
    name = runner.probes[plan.key].activation
    fit_bias = np.zeros_like(bias) if fit.down_bias is None else fit.down_bias
    reference = svd = joint_loss = 0.0
    for batch in batches:
        keep = runner.keep(batch)
        z = runner.vectors(plan.key, runner.run(batch, [name]), keep).astype(np.float64)
        z_svd = runner.vectors(plan.key, runner.run(batch, [name], overrides), keep).astype(np.float64)
        y = z @ down_matrix + bias
        reference += float(np.sum(y**2))
        svd += float(np.sum((z_svd @ svd_down + bias - y) ** 2))
        joint_loss += float(np.sum((z[:, fit.kept] @ fit.down_matrix + fit_bias - y) ** 2))
    scale = max(reference, np.finfo(np.float64).tiny)
    return svd / scale, joint_loss / scale


def _planned_matrix(group: WeightGroup, layer: pairs.Linear) -> np.ndarray:
    """The per-matrix plan's product as X·W (the node may store it transposed)."""
    dense = group.dense_weight(group.scheme, group.rank).astype(np.float64)
    return dense.T if layer.transposed else dense


# ----------------------------------------------------------------------------- rewrite


def rewrite(model: ir.Model, plans: Sequence[PairPlan], sink: Any = None) -> None:
    """Slice the chosen pairs' weights and biases to their kept neurons; no node is added."""
    names = NameGenerator(model)
    for plan in plans:
        if not plan.chosen:
            continue
        kept, fit = plan.fit.kept, plan.fit
        up, down = plan.pair.up, plan.pair.down
        _replace(up.node, up.weight, _stored(up, up.matrix()[:, kept]), names, sink)
        if up.bias is not None:
            bias = up.bias_array()[kept]
            _replace(up.bias_node or up.node, up.bias, bias.reshape(_bias_shape(up.bias, len(kept))), names, sink)
        _replace(down.node, down.weight, _stored(down, fit.down_matrix), names, sink)
        if down.bias is not None and fit.down_bias is not None:
            original = down.bias_array()
            _replace(down.bias_node or down.node, down.bias, fit.down_bias.reshape(_bias_shape(down.bias, len(original))),
                     names, sink)
        _forget_inner_shapes(plan.pair)


def _stored(layer: pairs.Linear, matrix: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(matrix.T if layer.transposed else matrix)


def _bias_shape(value: ir.Value, size: int) -> tuple[int, ...]:
    """The bias's own layout ((D,) or (1, D)) at the new size."""
    tensor = ir.convenience.get_const_tensor(value)
    return (1, size) if tensor is not None and len(tensor.shape) == 2 else (size,)


def _replace(node: ir.Node, old: ir.Value, array: np.ndarray, names: NameGenerator, sink: Any) -> None:
    """Give `node` a new initializer in place of its constant input `old` (cleanup drops the old one)."""
    dtype = ir.convenience.get_const_tensor(old).dtype
    value = add_initializer(node.graph, names(f"{old.name or node.name}_joint"), array, dtype, sink)
    index = next(i for i, v in enumerate(node.inputs) if v is old)
    node.replace_input_with(index, value)


def _forget_inner_shapes(pair: pairs.MlpPair) -> None:
    """The inner values now have k, not D, neurons: drop their recorded shapes (value_info)."""
    pending, seen = [pair.up.node.outputs[0]], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        value.shape = None
        if value is pair.activation:
            continue
        for node in value.consumers():
            if node is not pair.down.node:
                pending.extend(node.outputs)
