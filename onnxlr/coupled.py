"""The joint stage of the pipeline (`--methods svd,joint`): coupled MLP pairs keep k of their D inner neurons.

A coupled pair (onnxlr.pairs: linear -> elementwise activation -> linear) whose two weights are
factorization targets of their own can instead keep k neurons: the first weight's columns and bias
entries, and the second weight refitted by least squares on the calibration activations
(onnxlr.joint). Keeping k neurons only slices and replaces initializers: no node is added.

- With a whole-model budget (`--param-budget`, `--mac-budget`, and the `--target-cosine` /
  `--target-error` search over it), each pair is one more candidate of the allocation (a
  plan.JointUnit): its error at every k comes from one greedy elimination (joint.eliminate), in
  model-output units through the down layer's measured sensitivity. Once the budget gives a pair
  k neurons, `settle` compares it with the best per-matrix plan of its two layers at the same cost,
  both measured as the output error of the pair's second layer on calibration samples, and the pair
  takes whichever loses less.
- With a per-layer policy, `choose` compares the pair at its per-matrix plan's weight parameters.

The chosen fit is fed to the calibration runner as the down weight (zeros at the dropped neurons,
which is exactly the sliced pair) and the refitted down bias, so the target search, compensation
and sensitivity see joint pairs as they will be written. Joint pairs need calibration data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxlr import calibration, datafit, joint, pairs, plan
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
    elimination: joint.Elimination | None = None  # every k's error (measure)
    keep: int | None = None  # neurons the budget allocation gave the pair (plan.JointUnit)
    bias_slot: int | None = None  # the down bias's feed in the calibration runner

    @property
    def chosen(self) -> bool:
        return self.fit is not None

    @property
    def key(self) -> str:
        """The calibration probe of the second layer: it reads the activation the refit needs."""
        return self.down.lead.node.outputs[0].name

    # plan.JointUnit
    @property
    def groups(self) -> list[WeightGroup]:
        return [self.up, self.down]

    @property
    def width(self) -> int:
        return self.pair.width

    def cost(self, keep: int, measure: str) -> float:
        """The two layers' parameters (or MACs) at `keep` neurons: all of it scales with k but the down bias."""
        schemes = [g.scheme or g.schemes[0] for g in self.groups]
        if measure == "params":
            full, fixed = sum(s.params_before for s in schemes), schemes[1].fixed_params
        else:
            full, fixed = sum(s.macs_before for s in schemes), 0
        return fixed + (full - fixed) * keep / self.width

    def loss(self, keep: int) -> float:
        """The model's predicted output error: the down layer's relative error (without its bias, as the
        sensitivity was measured) times the down layer's sensitivity."""
        assert self.elimination is not None and self.down.sensitivity is not None
        return self.elimination.error(keep) / self.elimination.plain_share * self.down.sensitivity

    def feeds(self) -> dict[int, np.ndarray]:
        """The chosen fit as calibration feeds: the down weight padded with zero rows, and the down bias."""
        if self.fit is None or self.down.slot is None:
            return {}
        slot_array = self.down.lead.array
        padded = np.zeros((self.width, self.fit.down_matrix.shape[1]))
        padded[self.fit.kept] = self.fit.down_matrix
        result = {self.down.slot: _stored(self.pair.down, padded).astype(slot_array.dtype)}
        if self.bias_slot is not None and self.fit.down_bias is not None:
            stored = pairs._const(self.pair.down.bias)
            result[self.bias_slot] = self.fit.down_bias.reshape(stored.shape).astype(stored.dtype.numpy())
        return result

    def reset(self) -> None:
        self.fit = self.svd_error = self.joint_error = self.keep = None
        self.up.joint = self.down.joint = None

    def take(self, fit: joint.JointFit) -> None:
        self.fit = fit
        for group, side in ((self.up, "up"), (self.down, "down")):
            group.joint = JointRole(self, side)
            group.clear_reason()


@dataclasses.dataclass(frozen=True)
class JointRole:
    """What a WeightGroup of a chosen pair shows in its report row, and feeds to the calibration runner."""

    plan: PairPlan
    side: str  # "up" or "down"

    @property
    def partner(self) -> str:
        other = self.plan.down if self.side == "up" else self.plan.up
        return other.lead.name

    def feeds(self) -> dict[int, np.ndarray]:
        return self.plan.feeds() if self.side == "down" else {}  # the up weight is kept as it is


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


def bias_slots(plans: Sequence[PairPlan]) -> list[calibration.Slot]:
    """A calibration feed for each pair's down bias (the refit changes it); one per plan, None without a bias."""
    slots = []
    for plan_ in plans:
        down = plan_.pair.down
        if down.bias is None:
            slots.append(None)
            continue
        reader = down.bias_node or down.node
        index = next(i for i, v in enumerate(reader.inputs) if v is down.bias)
        slots.append(calibration.Slot(keys=[reader.outputs[0].name], weight_inputs=[index],
                                      array=pairs._const(down.bias).numpy(), transposed=[False]))
    return slots


def measurable(plans: Sequence[PairPlan], runner: Any) -> list[PairPlan]:
    return [p for p in plans if p.up.slot is not None and p.down.slot is not None and p.key in runner.probes]


def measure(plans: Sequence[PairPlan], runner: Any, batches: list[dict[str, np.ndarray]], progress: Progress
            ) -> list[PairPlan]:
    """Each measurable pair's elimination (every k's error); returns those pairs."""
    plans = measurable(plans, runner)
    correlations = _correlations(plans, runner, batches, progress)
    for plan_ in progress(plans, "joint pairs"):
        plan_.elimination = joint.eliminate(plan_.pair.down.matrix(), plan_.pair.down.bias_array(),
                                            correlations[id(plan_)])
    return plans


def settle(plans: Sequence[PairPlan], settings: Settings, runner: Any, batches: list[dict[str, np.ndarray]]) -> None:
    """After a budget allocation: each pair takes its joint fit at the k it was given, or the best
    per-matrix plan of its two layers at the same cost, whichever loses less on calibration samples."""
    assert settings.budget is not None
    measure_name, _ = settings.budget
    flag = "--param-budget" if measure_name == "params" else "--mac-budget"
    comparison = datafit.first_samples(batches, COMPARISON_SAMPLES)
    for plan_ in plans:
        keep = plan_.keep if plan_.keep is not None else plan_.width
        if keep >= plan_.width:
            for group in plan_.groups:
                group.keep_dense("kept_dense_by_budget", f"kept dense by the {flag} allocation")
            continue
        fit = plan_.elimination.fit(keep)
        share = plan_.cost(keep, measure_name) / plan_.cost(plan_.width, measure_name)
        if not _plan_per_matrix(plan_, settings, share):
            plan_.take(fit)  # no per-matrix plan fits the pair's share of the budget
            continue
        plan_.svd_error, plan_.joint_error = _errors(plan_, fit, runner, comparison)
        if plan_.joint_error <= plan_.svd_error:
            plan_.take(fit)
    logger.info("joint pairs: %d of %d chosen over per-matrix factorization", sum(p.chosen for p in plans), len(plans))


def _plan_per_matrix(plan_: PairPlan, settings: Settings, fraction: float) -> bool:
    """The two layers planned alone on the pair's share of the budget; False when no rank fits it."""
    field = "param_budget" if settings.budget[0] == "params" else "mac_budget"
    local = dataclasses.replace(settings, **{field: fraction, "target_cosine": None, "target_error": None})
    try:
        plan.allocate_budget(plan_.groups, local)
    except OnnxlrError:  # the rank multiple in both layers is over the pair's share
        return False
    for group in plan_.groups:
        if group.factorized:
            plan.apply_break_even(group, local)
    return True


def choose(plans: list[PairPlan], runner: Any, batches: list[dict[str, np.ndarray]], progress: Progress) -> None:
    """Per-layer policies: fit each pair at its per-matrix plan's weight parameters; keep it where it loses less."""
    plans = [p for p in measurable(plans, runner) if p.up.factorized or p.down.factorized]
    if not plans:
        return
    correlations = _correlations(plans, runner, batches, progress)
    comparison = datafit.first_samples(batches, COMPARISON_SAMPLES)
    for plan_ in progress(plans, "joint pairs"):
        width = plan_.pair.width
        keep = joint.keep_for_params(plan_.pair.up.matrix().shape[0], width, plan_.pair.down.matrix().shape[1],
                                     _weight_params_after(plan_.up) + _weight_params_after(plan_.down),
                                     up_bias=False, down_bias=False)
        if keep >= width:
            continue
        fit = joint.select_and_refit(plan_.pair.down.matrix(), plan_.pair.down.bias_array(),
                                     correlations[id(plan_)], keep)
        plan_.svd_error, plan_.joint_error = _errors(plan_, fit, runner, comparison)
        if plan_.joint_error < plan_.svd_error:
            plan_.take(fit)
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
