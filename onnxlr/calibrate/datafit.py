"""Data-aware steps of the optimize pipeline: statistics, sensitivity, error compensation, target search.

All of them run the ORIGINAL model through one onnxruntime session (onnxlr.calibrate.calibration.Runner)
in which every factorizable weight can be replaced by a feed. Feeding A @ B in a weight's place
computes exactly what the rewritten pair computes (up to float rounding), so a factorization is
measured without rewriting or reloading the graph:

- statistics: the Gram of each target's input on the calibration data (whitened SVD);
- sensitivity: how far the model's outputs move per unit of a layer's lost whitened energy,
  measured by factorizing that layer alone; `--param-budget` allocates ranks with it;
- compensation: layer by layer in dependency order, the statistics of the model whose earlier
  layers are already factorized, and each pair refitted by least squares to the original layer's
  outputs (lowrank.whitened_svd with `cross`), so later layers correct what earlier ones lost;
- `--target-cosine` / `--target-error`: bisection on the parameter budget for the smallest model
  whose outputs keep the cosine (or stay within the relative error) on held-out samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from onnxlr.calibrate import calibration
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank
from onnxlr.factorize.decisions import Plan
from onnxlr.factorize.groups import WeightGroup
from onnxlr.factorize.svd import Statistics
from onnxlr.passes import Scheme
from onnxlr.protocols import CalibrationRunner
from onnxlr.verification.task_metrics import token_inputs
from onnxlr.verification.verify import Gates, compare_arrays

logger = logging.getLogger(__name__)

# Sensitivity is measured on the first batches of the calibration data: enough to rank layers.
SENSITIVITY_SAMPLES = 64
# Each layer is probed at the rank that keeps this fraction of its parameters.
SENSITIVITY_PARAM_RATIO = 0.5
SEARCH_STEPS = 8


@dataclasses.dataclass(frozen=True)
class CalibrationData:
    """What the data-aware steps need: the original model's file (or bytes) and the data batches."""

    source: str | os.PathLike | bytes  # onnxruntime reads the original here (external data beside it)
    batches: list[dict[str, np.ndarray]]  # calibration samples
    heldout: list[dict[str, np.ndarray]] | None = None  # samples --target-cosine is measured on
    # Bytes of weights per segment when the model does not fit in memory whole: statistics are collected block by
    # block (onnxlr.verification.segments), and the steps that run the whole model are not available.
    segment_budget: int | None = None

    @property
    def samples(self) -> int:
        return sum(_batch_size(batch) for batch in self.batches)


def _batch_size(batch: Mapping[str, np.ndarray]) -> int:
    return min((len(a) for a in batch.values() if a.ndim), default=1)


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """What the calibration stage returns: the runner later steps reuse (None when no layer could be probed) and
    each group's statistics (by id)."""

    runner: calibration.Runner | None
    statistics: Mapping[int, Statistics]


def prepare(model: ir.Model, groups: Sequence[WeightGroup], data: CalibrationData, progress,
            extra_slots: Sequence[calibration.Slot | None] = ()) -> Calibrated:
    """Gram of every active main-graph group's input, and the runner later steps reuse.

    `extra_slots` (e.g. the down biases of coupled pairs) become feeds after the groups' own;
    `runner.slots` gives their indices.

    Each such group gets a feed in the runner (`runner.feed(group)`: its weight's index) and a Gram. A group whose
    readers see the weight differently (a tied head's transpose, an embedding's Gather) gets a feed
    but no Gram: it takes the plain SVD, and sensitivity, compensation and the target search still
    measure it (one Gram needs every reader to multiply the same matrix from the same side).
    """
    main = [g for g in groups if not g.excluded and all(t.node.graph is model.graph for t in g.targets)]
    tables = {id(g): weights for g in main if (weights := row_weights(g, data.batches)) is not None}
    keys = {t.node.outputs[0].name for g in main if g.uniform for t in g.targets}
    constants = any(t.context.inputs_as_constants for g in main for t in g.targets)
    found = [probe for probe in calibration.probes(model, constants) if probe.key in keys]
    if not found:
        return Calibrated(None, {key: Statistics(row_weights=weights) for key, weights in tables.items()})
    probed = {probe.key for probe in found}
    # Lookups (an embedding's Gather) take no statistics but get a feed: sensitivity and the search measure them.
    keyed = [g for g in main if not g.uniform or not g.lead.rule.calibrated
             or all(t.node.outputs[0].name in probed for t in g.targets)]
    slots = [_slot(g) for g in keyed] + [slot for slot in extra_slots if slot is not None]
    runner = calibration.Runner(data.source, model, found, slots, data.segment_budget)
    moments = calibration.moments(runner, progress(data.batches, "calibration"))
    fed = {id(g) for g in keyed}
    statistics: dict[int, Statistics] = {}
    for group in main:
        taken = [moments[t.node.outputs[0].name] for t in group.targets if t.node.outputs[0].name in moments]
        if taken and group.uniform and id(group) in fed:  # one reader: its (possibly shared) Gram as it is, not a copy
            sums = cast("list[np.ndarray]", [acc.sums for acc in taken])  # moments() keeps those that saw vectors
            statistics[id(group)] = Statistics(gram=lowrank.summed_grams([acc.result() for acc in taken]),
                                               row_weights=tables.get(id(group)),
                                               input_moments=(np.sum(sums, axis=0), sum(acc.count for acc in taken)))
        elif id(group) in tables:
            statistics[id(group)] = Statistics(row_weights=tables[id(group)])
    return Calibrated(runner, statistics)


def row_weights(group: WeightGroup, batches: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray | None:
    """For a table only lookups read whose ids are a graph input: how often each row is looked up in the
    calibration batches (padding left out when there is an attention mask of the ids' shape), plus 1."""
    if group.lead.rule.calibrated or any(t.rule.calibrated for t in group.targets):
        return None
    # One ids input per lookup (two lookups of the same ids count twice: each reads the rows).
    ids = [cast(str, t.node.inputs[1].name) for t in group.targets  # ONNX names every graph input
           if t.node.inputs[1] is not None and t.node.inputs[1].is_graph_input()]
    if len(ids) != len(group.targets) or not batches or not all(name in batches[0] for name in ids):
        return None  # computed ids (positions, token types): the plain SVD
    rows = group.lead.array.shape[0]
    counts = np.zeros(rows)
    for batch in batches:
        mask = batch.get(calibration.MASK_INPUT_NAME)
        keep = np.asarray(mask) != 0 if mask is not None else None
        for name in ids:
            values = np.asarray(batch[name]).astype(np.int64)
            if keep is not None and keep.shape == values.shape:
                values = values[keep]
            values = values.reshape(-1)
            values = np.where(values < 0, values + rows, values)
            counts += np.bincount(values[(values >= 0) & (values < rows)], minlength=rows)
    return counts + 1.0


def _slot(group: WeightGroup) -> calibration.Slot:
    """Every reader of the group's weight, and whether it reads the lead's array or its transpose."""
    lead = group.lead.array
    keys = [cast(str, t.node.outputs[0].name) for t in group.targets]  # a loaded model names them
    return calibration.Slot(keys=keys,
                            weight_inputs=[t.weight_input for t in group.targets], array=lead,
                            transposed=[t.array is not lead and not np.array_equal(t.array, lead)
                                        for t in group.targets], owner=id(group))


# ----------------------------------------------------------------------------- measuring a factorization


def relative_error(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    """Sum over float outputs of ||Y' - Y||^2 / ||Y||^2: additive over small independent perturbations."""
    total = 0.0
    for name, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        ref64, out64 = ref.astype(np.float64), candidate[name].astype(np.float64)
        total += float(np.sum((out64 - ref64) ** 2) / max(np.sum(ref64**2), np.finfo(np.float64).tiny))
    return total


def min_cosine(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    """The smallest cosine over float outputs (flattened), as `verify --min-cosine` measures it."""
    cosines = [compare_arrays(ref, candidate[name], Gates())["cosine"]
               for name, ref in reference.items() if ref.dtype.kind == "f"]
    return min(cosines, default=1.0)


def task_metric(name: str, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                inputs: Mapping[str, np.ndarray]) -> float:
    """The smallest value of a verification task metric (`--min-metric NAME`) over the outputs that have it, measured
    as verification measures it (`inputs`: the attention mask and input ids it reads)."""
    from onnxlr.verification.task_metrics import attention_mask, token_ids
    from onnxlr.verification.verify import TASK_METRICS

    key, mask, ids = TASK_METRICS[name], attention_mask(inputs), token_ids(inputs)
    values = [metrics[key] for output, ref in reference.items() if ref.dtype.kind == "f"
              for metrics in [compare_arrays(ref, candidate[output], Gates(), name=output, mask=mask, token_ids=ids)]
              if key in metrics]
    if not values:
        raise OnnxlrError(f"{{0}}: no output of this model has {key} on the held-out samples (score outputs have "
                          "top-1, embeddings neighbour agreement over at least 6 samples)", f"target_{name}")
    return min(values)


def max_relative_error(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    """The largest ||Y' - Y|| / ||Y|| over float outputs (flattened)."""
    errors = [np.sqrt(relative_error({name: ref}, candidate)) for name, ref in reference.items() if ref.dtype.kind == "f"]
    return float(max(errors, default=0.0))


@dataclasses.dataclass(frozen=True)
class Goal:
    """An end-to-end target on held-out outputs: cosine >= value, relative error <= value, or a task metric of the
    verification (top1, neighbours: onnxlr.verification.verify.TASK_METRICS) >= value, its worst output's."""

    metric: str  # "cosine", "error", "top1" or "neighbours"
    value: float

    @classmethod
    def of(cls, settings: Any) -> Goal | None:
        goal = settings.goal  # onnxlr.policies.TargetCosine / TargetError
        return cls(goal.metric, goal.value) if goal is not None else None

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "error"

    def measure(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                inputs: Mapping[str, np.ndarray] | None = None) -> float:
        """The metric on the held-out outputs (`inputs`: the held-out attention mask and input ids, joined:
        onnxlr.verification.task_metrics.token_inputs; they pool per-token outputs and give a language model's next
        tokens)."""
        if self.metric == "cosine":
            return min_cosine(reference, candidate)
        if self.metric == "error":
            return max_relative_error(reference, candidate)
        return task_metric(self.metric, reference, candidate, inputs or {})

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.higher_is_better else measured <= self.value

    def __str__(self) -> str:
        return f"--target-{self.metric} {self.value:g}"


def factorized_overrides(plan: Plan, groups: Iterable[WeightGroup], runner: CalibrationRunner
                         ) -> dict[int, np.ndarray]:
    """Feeds that replace every factorized group's weight by its low-rank product (and joint pairs' by their fit)."""
    groups = list(groups)
    overrides = joint_feeds(plan, groups, runner)
    overrides.update({feed: plan.planned_weight(g) for g in groups
                      if (feed := runner.feed(g)) is not None and plan.factorized(g)})
    return overrides


def joint_feeds(plan: Plan, groups: Iterable[WeightGroup], runner: CalibrationRunner) -> dict[int, np.ndarray]:
    """The feeds of the layers compressed jointly with a coupled partner (onnxlr.coupled.plans.JointRole)."""
    feeds: dict[int, np.ndarray] = {}
    for group in groups:
        role = plan[group].joint
        if role is not None:
            feeds.update(role.feeds(runner))
    return feeds


def measure_sensitivity(plan: Plan, groups: Sequence[WeightGroup], runner: calibration.Runner,
                        data: CalibrationData, choose_scheme, progress) -> dict[int, float]:
    """Each measurable group's sensitivity, by group (id): the model's relative output error per unit of the
    layer's lost energy. Whole-model allocation weighs energy by it; the report shows it.

    The layer alone is factorized at the rank that keeps SENSITIVITY_PARAM_RATIO of its parameters.
    """
    sensitivities: dict[int, float] = {}
    batches = first_samples(data.batches, SENSITIVITY_SAMPLES)
    reference = calibration.model_outputs(runner, batches)
    measurable = [g for g in groups if not plan[g].reason and runner.feed(g) is not None]
    for group in progress(measurable, "sensitivity"):
        scheme = choose_scheme(group)
        rank = lowrank.rank_for_param_ratio(SENSITIVITY_PARAM_RATIO, scheme.params_before, scheme.params_per_rank,
                                            scheme.full_rank)
        lost = 1.0 - plan.svd.decomposition(group, scheme).retained_energy(rank)
        if lost <= 0:
            sensitivities[id(group)] = 0.0
            continue
        feed = cast(int, runner.feed(group))  # measurable
        outputs = calibration.model_outputs(runner, batches, {feed: plan.svd.dense_weight(group, scheme, rank)})
        sensitivities[id(group)] = relative_error(reference, outputs) / lost
    return sensitivities


def first_samples(batches: list[dict[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    taken, count = [], 0
    for batch in batches:
        if count >= samples:
            break
        taken.append(batch)
        count += _batch_size(batch)
    return taken


# ----------------------------------------------------------------------------- error compensation


def compensate(model: ir.Model, plan: Plan, groups: Sequence[WeightGroup], runner: calibration.Runner,
               data: CalibrationData, progress) -> int:
    """Refit the factorized groups stage by stage on the inputs of the partially factorized model.

    Stage s holds the groups with s factorized layers on the longest path before them; a stage's
    statistics are taken with every earlier stage's weights replaced by their (refitted) products.
    The refitted statistics replace the groups' in `plan.svd`. Returns the number of groups refitted.
    """
    factorized = [g for g in groups if plan.factorized(g) and runner.feed(g) is not None]
    # Joint pairs keep their fit (made on the original activations); the layers after them see it.
    overrides = joint_feeds(plan, groups, runner)
    refitted = 0
    for stage in progress(dependency_stages(model, factorized), "compensation"):
        whitened = [g for g in stage if plan.svd.whitens(g, cast(Scheme, plan[g].scheme))]  # factorized: planned
        if overrides and whitened:  # the first stage sees the original inputs: nothing to correct
            keys = [t.node.outputs[0].name for g in whitened for t in g.targets]
            statistics = calibration.compensation_statistics(runner, data.batches, keys, overrides)
            for group in whitened:
                pairs = [statistics[t.node.outputs[0].name] for t in group.targets]
                plan.svd.refit(group, dataclasses.replace(plan.svd.statistics(group),
                                                          gram=np.sum([gram for gram, _ in pairs], axis=0),
                                                          cross=np.sum([cross for _, cross in pairs], axis=0)))
                refitted += 1
        for group in stage:
            overrides[cast(int, runner.feed(group))] = plan.planned_weight(group)
    return refitted


def dependency_stages(model: ir.Model, groups: Sequence[WeightGroup]) -> list[list[WeightGroup]]:
    """Groups by the number of their fellow groups' nodes on the longest path before them (graph order)."""
    group_of = {id(t.node): g for g in groups for t in g.targets}
    level: dict[int, int] = {}  # id(value) -> factorized layers on the longest path that produced it
    stage: dict[int, int] = {}  # id(group) -> stage
    for node in model.graph:  # topologically sorted
        depth = max((level.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        group = group_of.get(id(node))
        if group is not None:
            stage[id(group)] = max(stage.get(id(group), 0), depth)
            depth += 1
        for value in node.outputs:
            level[id(value)] = depth
    ordered: dict[int, list[WeightGroup]] = {}
    for group in groups:
        ordered.setdefault(stage.get(id(group), 0), []).append(group)
    return [ordered[key] for key in sorted(ordered)]


# ----------------------------------------------------------------------------- --target-cosine / --target-error


def search_budget(plan: Plan, groups: Sequence[WeightGroup], goal: Goal, runner: calibration.Runner, data: CalibrationData,
                  plan_at, progress) -> list[dict[str, float]]:
    """Bisection on the parameter budget for the smallest plan whose held-out outputs meet `goal`.

    `plan_at(budget)` plans every group for that budget (raising OnnxlrError when it is infeasible).
    Ends with the groups planned at the best budget found (all dense if none meets the target).
    Returns the trace: one {budget, cosine or error} per measured plan.
    """
    if not data.heldout:
        raise OnnxlrError("{0} needs held-out samples to measure on: give {1} (e.g. FILE.npz)",
                          f"target_{goal.metric}", "heldout")
    reference = calibration.model_outputs(runner, data.heldout)
    trace: list[dict[str, float]] = []

    def cosine_at(budget: float) -> float | None:
        assert data.heldout  # checked above
        try:
            plan_at(budget)
        except OnnxlrError:  # rank 1 everywhere is already over this budget
            return None
        value = goal.measure(reference, calibration.model_outputs(runner, data.heldout,
                                                                     factorized_overrides(plan, groups, runner)),
                             token_inputs(data.heldout))
        trace.append({"budget": budget, goal.metric: value})
        return value

    low, high, best = 0.0, 1.0, None
    for _ in progress(range(SEARCH_STEPS), "target search"):
        middle = (low + high) / 2
        value = cosine_at(middle)
        if value is not None and goal.met(value):
            high, best = middle, middle
        else:
            low = middle
    if best is None:
        value = cosine_at(1.0)
        best = 1.0 if value is not None and goal.met(value) else None
    if best is None:
        plan_at(None)
    else:
        plan_at(best)
    return trace
