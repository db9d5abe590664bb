"""The joint stage of the pipeline (`--methods svd,joint`): coupled pairs shrink their shared inner width.

A coupled pair whose two weights are factorization targets of their own can instead keep k of its
inner dimensions, with no node added (only initializers and shape constants are replaced):
- MLP, gated MLP and conv channel pairs (onnxlr.coupled.pairs, onnxlr.coupled.conv_pairs): keep k neurons, the
  first weight's columns sliced, the second refitted by least squares on the calibration
  activations (onnxlr.coupled.joint);
- attention V·O pairs (onnxlr.coupled.heads): every head keeps k of its d dimensions, V projected per head
  by a whitened SVD of the head's V·O product and O refitted;
- attention Q·Kᵀ pairs (onnxlr.coupled.scores): the query and key heads projected onto k dimensions by a
  two-sided whitened SVD. They have no down layer: their sensitivity and their comparison with
  per-matrix plans are measured on the model's outputs.

Every kind answers the same calls (the PairKind Protocol: eliminate, fit_at, fit_feeds, fit_slices,
fed_biases, role_params; every kind but Q·Kᵀ also DownPairKind's effective_down), so this module prices,
compares and rewrites them alike:
- With a whole-model budget (`--param-budget`, `--mac-budget`, and the `--target-cosine` /
  `--target-error` search over it), each pair is one more candidate of the allocation (a
  onnxlr.factorize.plan.JointUnit): its error at every k comes from one elimination, in model-output units
  through the down layer's measured sensitivity (the pair's own for Q·Kᵀ). Once the budget gives a
  pair k, `settle` compares it with the best per-matrix plan of its layers at the same cost, both
  measured as the output error of the pair's second layer (the model's, for Q·Kᵀ) on calibration
  samples, and the pair takes whichever loses less.
- With a per-layer policy, `choose` compares the pair at its per-matrix plan's weight parameters.

The chosen fit is fed to the calibration runner at the original shapes (zeros at the dropped
dimensions, which is exactly the sliced pair) with its changed biases, so the target search,
compensation and sensitivity see joint pairs as they will be written. Joint pairs need calibration data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np
import onnx_ir as ir

from onnxlr.calibrate import calibration, datafit
from onnxlr.coupled import conv_pairs, heads, joint, pairs, scores
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import plan as planning
from onnxlr.factorize.decisions import Decision, Plan
from onnxlr.factorize.groups import WeightGroup
from onnxlr.factorize.revert import JOINT_UNIT
from onnxlr.factorize.rewrite import add_initializer
from onnxlr.factorize.svd import Statistics
from onnxlr.passes import NameGenerator
from onnxlr.settings import Progress, Settings

if TYPE_CHECKING:
    from onnxlr.protocols import CalibrationRunner, WeightSink
    from onnxlr.timing.measured import Measured

logger = logging.getLogger(__name__)

# The pair's output error is compared on the first calibration samples (as sensitivity is).
COMPARISON_SAMPLES = 64


# ----------------------------------------------------------------------------- what every kind answers

FitT = TypeVar("FitT", bound="PairFit")
FitT_co = TypeVar("FitT_co", bound="PairFit", covariant=True)


class PairFit(Protocol):
    """A pair's fit at k (joint.JointFit, heads.HeadFit, scores.ScoreFit): this module reads how many it keeps."""

    @property
    def kept(self) -> np.ndarray: ...  # the kept neurons (a head pair's: arange(k)); len() is k


class PairElimination(Protocol[FitT_co]):
    """Every k's error of one pair, and its fit at k on demand (joint.Elimination, heads.HeadElimination,
    scores.ScoreElimination)."""

    @property
    def plain_share(self) -> float: ...  # converts the error to the down layer's output without its bias

    def error(self, keep: int, /) -> float: ...

    def fit(self, keep: int, /) -> FitT_co: ...


class PairKind(Protocol[FitT]):
    """What this module asks of every coupled pair (pairs.MlpPair, conv_pairs.ConvPair, heads.HeadPair,
    scores.ScorePair). FitT is the kind's own fit: a pair takes back only the fits it made. A correlation is
    the augmented Σ [z,1][z,1]ᵀ of the down layer's input (for Q·Kᵀ: the query's and the key's, a pair)."""

    @property
    def kind(self) -> str: ...  # the report's name of the kind

    @property
    def width(self) -> int: ...  # the inner width D (a head pair's head size d)

    @property
    def weights_per_neuron(self) -> int: ...  # weight parameters one kept neuron costs

    def weight_params(self, keep: int, /) -> int: ...

    def role_params(self, index: int, keep: int, /) -> tuple[int, int]: ...

    def eliminate(self, correlation: Any, /) -> PairElimination[FitT]: ...

    def fit_at(self, correlation: Any, keep: int, /) -> FitT: ...

    def fit_feeds(self, fit: FitT, /) -> list[tuple[ir.Value, np.ndarray]]: ...

    def fit_slices(self, fit: FitT, /) -> list[pairs.Slice]: ...

    def fed_biases(self) -> list[tuple[ir.Node, ir.Value]]: ...

    def inner_values(self) -> list[ir.Value]: ...


class DownPairKind(PairKind[FitT], Protocol[FitT]):
    """A pair whose down layer's output shows its error (every kind but Q·Kᵀ): the two plans are compared there."""

    @property
    def down(self) -> pairs.Linear | conv_pairs.ConvLayer: ...

    def down_matrix(self) -> np.ndarray: ...

    def down_bias(self) -> np.ndarray | None: ...

    def effective_down(self, fit: FitT, /) -> tuple[np.ndarray, np.ndarray | None]: ...


if TYPE_CHECKING:
    def _kinds(mlp: pairs.MlpPair, conv: conv_pairs.ConvPair, values: heads.HeadPair, products: scores.ScorePair
               ) -> tuple[DownPairKind[joint.JointFit], DownPairKind[joint.JointFit], DownPairKind[heads.HeadFit],
                          PairKind[scores.ScoreFit]]:
        """Never run: the type checker holds each kind to the Protocols, with its own fit."""
        return mlp, conv, values, products


# ----------------------------------------------------------------------------- the pairs


@dataclasses.dataclass
class PairPlan:
    """A coupled pair (any PairKind), the weight groups of its layers, and (once chosen) its joint fit."""

    pair: PairKind[Any]
    ups: list[WeightGroup]  # one per pair.up_layers(), in that order
    down: WeightGroup
    fit: PairFit | None = None
    svd_error: float | None = None  # output error of the pair's down layer under the per-matrix plan
    joint_error: float | None = None  # and under the joint fit at the same weight parameters
    elimination: PairElimination[PairFit] | None = None  # every k's error
    # What prices its error (coupled.measure): the down layer's sensitivity; a Q·Kᵀ pair's own (it has no down layer)
    sensitivity: float | None = None
    keep: int | None = None  # neurons the budget allocation gave the pair (onnxlr.factorize.plan.JointUnit)
    bias_slots: dict[int, int] = dataclasses.field(default_factory=dict)  # id(bias) -> its calibration feed

    @property
    def chosen(self) -> bool:
        return self.fit is not None

    @property
    def key(self) -> str:
        """The calibration probe of the down layer: it reads the activation the refit needs."""
        return cast(str, self.down.lead.node.outputs[0].name)  # a loaded model names its values

    # onnxlr.factorize.plan.JointUnit
    @property
    def groups(self) -> list[WeightGroup]:
        return [*self.ups, self.down]

    @property
    def width(self) -> int:
        return self.pair.width

    def cost(self, keep: int, measure: str) -> float:
        """The pair's parameters at `keep` neurons, as its report rows count them (weights, biases and a
        BatchNormalization's entries; the down bias fixed); or its MACs, which scale with k."""
        if measure == "params":
            return self.pair.weight_params(keep)
        # Every view of a layer costs the same MACs before: its first view's.
        return sum(g.schemes[0].macs_before for g in self.groups) * keep / self.width

    def loss(self, keep: int) -> float:
        """The model's predicted output error: the down layer's relative error (without its bias, as the
        sensitivity was measured) times the down layer's sensitivity."""
        assert self.elimination is not None and self.sensitivity is not None
        return self.elimination.error(keep) / self.elimination.plain_share * self.sensitivity

    def feeds(self, runner: CalibrationRunner) -> dict[int, np.ndarray]:
        """The chosen fit as calibration feeds at the original shapes, zeros at the dropped neurons
        (exactly the sliced pair: their activations meet zero weights), and the refitted biases."""
        return {} if self.fit is None else self.feeds_of(self.fit, runner)

    def feeds_of(self, fit: PairFit, runner: CalibrationRunner) -> dict[int, np.ndarray]:
        feeds = [runner.feed(g) for g in self.groups]
        if any(feed is None for feed in feeds):
            return {}
        slots = {id(g.lead.weight): cast(int, feed) for g, feed in zip(self.groups, feeds)} | self.bias_slots
        return {slots[id(value)]: array for value, array in self.pair.fit_feeds(fit) if id(value) in slots}

    def reset(self, plan: Plan) -> None:
        self.fit = self.svd_error = self.joint_error = self.keep = None
        for group in self.groups:
            plan.set_joint(group, None)

    def take(self, fit: PairFit, plan: Plan) -> None:
        """Choose the joint fit: each layer's decision becomes its role in the pair."""
        self.fit = fit
        for index, group in enumerate(self.groups):
            plan.set_joint(group, JointRole(self, index))


@dataclasses.dataclass(frozen=True)
class JointRole:
    """What a WeightGroup of a chosen pair shows in its report row, and feeds to the calibration runner."""

    plan: PairPlan
    index: int  # in plan.groups: an up layer, or the down layer (the last)

    @property
    def side(self) -> str:
        return "down" if self.index == len(self.plan.ups) else "up"

    @property
    def partner(self) -> str:
        """An up layer's partner is the down layer; the down layer's is the first up layer."""
        other = self.plan.down if self.side == "up" else self.plan.ups[0]
        return other.lead.name

    def params(self) -> tuple[int, int]:
        """The layer's parameters before and after (an up conv's row also counts its BatchNormalization)."""
        fit = self.plan.fit
        assert fit is not None  # a group has a role only while its pair's fit is taken
        return self.plan.pair.role_params(self.index, len(fit.kept))

    def feeds(self, runner: CalibrationRunner) -> dict[int, np.ndarray]:
        return self.plan.feeds(runner) if self.side == "down" else {}  # the up weights' kept outputs are unchanged


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of coupled pair: its finder (model -> its pairs, and (node, reason) for each candidate that is not
    one), and the kinds whose word on a node it replaces (it pairs, or rejects, those nodes itself)."""

    name: str
    find: Callable[[ir.Model], tuple[Sequence[Any], Sequence[tuple[ir.Node, str]]]]
    overrides: tuple[str, ...] = ()


# Every kind, in the order its pairs claim layers (a layer in two pairs goes to the first kind's); adding a kind is
# one entry here, its module answering PairKind.
KINDS: tuple[Kind, ...] = (
    Kind("mlp", pairs.find_mlp_pairs),
    Kind("conv", conv_pairs.find_conv_pairs),
    Kind("attention-vo", heads.find_head_pairs),
    # Query and key projections are the Q·Kᵀ finder's: its pairs and reasons replace the V·O finder's word.
    Kind("attention-qk", scores.find_score_pairs, overrides=("attention-vo",)),
)


def find(model: ir.Model, groups: Sequence[WeightGroup]) -> tuple[list[PairPlan], list[dict[str, str]]]:
    """The coupled pairs of every kind (KINDS) whose weights are each one group's only reader (plain, unshared
    weights), no layer in two pairs (in a chain, the first pair in graph order takes it); and {node, reason} for
    each candidate that is not one."""
    by_node = {id(g.lead.node): g for g in groups if len(g.targets) == 1 and not g.excluded}
    found = {kind.name: kind.find(model) for kind in KINDS}
    rejections = {name: list(rejected) for name, (_, rejected) in found.items()}
    for kind in KINDS:
        kind_pairs, kind_rejected = found[kind.name]
        settled = {id(node) for node, _ in kind_rejected} | {
            id(layer.node) for pair in kind_pairs for layer in (*pair.up_layers(), pair.down)}
        for name in kind.overrides:
            rejections[name] = [(node, reason) for node, reason in rejections[name] if id(node) not in settled]
    # A loaded model's node names are strings ('' when unnamed): the casts below.
    rejected = [{"node": cast(str, node.name), "reason": reason}
                for kind in KINDS for node, reason in rejections[kind.name]]
    plans: list[PairPlan] = []
    taken: set[int] = set()
    for pair in (pair for kind in KINDS for pair in found[kind.name][0]):
        layers = [*pair.up_layers(), pair.down]
        layer_groups = [by_node.get(id(layer.node)) for layer in layers]
        outside = [layer.node.name for g, layer in zip(layer_groups, layers) if g is None or g.lead.weight is not layer.weight]
        first = cast(str, layers[0].node.name)
        if outside:
            rejected.append({"node": first, "reason": f"layer '{outside[0]}' is not a target of its own "
                             "(skipped, shared or excluded)"})
        elif any(id(g) in taken for g in layer_groups):
            rejected.append({"node": first, "reason": "a layer already belongs to the pair before it"})
        else:
            taken.update(id(g) for g in layer_groups)
            own = cast("list[WeightGroup]", layer_groups)  # none is outside: every layer has its group
            plans.append(PairPlan(pair, own[:-1], own[-1]))
    return plans, rejected


def summary(plans: Sequence[PairPlan], rejected: Sequence[dict[str, str]]) -> dict[str, Any]:
    """What the report says of the coupled pairs: each one's outcome, and the candidates that were not pairs."""
    found = []
    for pair_plan in plans:
        if pair_plan.chosen:
            outcome = "joint"
        elif pair_plan.joint_error is not None:
            outcome = "per-matrix: it loses less output error at the same cost"
        else:
            outcome = "per-matrix: no joint fit was compared (a per-layer plan kept it whole, or no budget left)"
        entry = {"kind": pair_plan.pair.kind, "up": [g.lead.name for g in pair_plan.ups],
                 "down": pair_plan.down.lead.name, "width": pair_plan.width, "chosen": pair_plan.chosen,
                 "kept": len(pair_plan.fit.kept) if pair_plan.fit is not None else None, "outcome": outcome,
                 "joint_error": pair_plan.joint_error, "per_matrix_error": pair_plan.svd_error}
        found.append(entry)
    return {"found": found, "not_pairs": list(rejected)}


def bias_slots(plans: Sequence[PairPlan]) -> list[tuple[PairPlan, ir.Value, calibration.Slot]]:
    """A calibration feed for each bias a pair's fit changes: (the pair, the bias, its slot)."""
    slots: list[tuple[PairPlan, ir.Value, calibration.Slot]] = []
    for pair_plan in plans:
        for reader, bias in pair_plan.pair.fed_biases():
            index = next(i for i, v in enumerate(reader.inputs) if v is bias)
            tensor = pairs._const(bias)
            assert tensor is not None  # the finders took only constant biases
            key = cast(str, reader.outputs[0].name)  # a loaded model's values are named
            slots.append((pair_plan, bias, calibration.Slot(keys=[key], weight_inputs=[index],
                                                            array=tensor.numpy(), transposed=[False])))
    return slots


def attach_bias_slots(slots: Sequence[tuple[PairPlan, ir.Value, calibration.Slot]], runner: CalibrationRunner) -> None:
    """Each pair's bias feeds, by their index in the runner (datafit.prepare appended them)."""
    index = {id(slot): i for i, slot in enumerate(runner.slots)}
    for pair_plan, bias, slot in slots:
        pair_plan.bias_slots[id(bias)] = index[id(slot)]


def measurable(plan: Plan, plans: Sequence[PairPlan], runner: CalibrationRunner) -> list[PairPlan]:
    """The pairs whose layers all have calibration feeds and statistics (a Q·Kᵀ pair: both inputs' moments)."""
    return [p for p in plans if all(runner.feed(g) is not None for g in p.groups) and p.key in runner.probes and
            (not isinstance(p.pair, scores.ScorePair)
             or all(_has_moments(plan.svd.statistics(g)) for g in p.groups))]


def measure(plan: Plan, plans: Sequence[PairPlan], runner: CalibrationRunner, batches: list[dict[str, np.ndarray]],
            progress: Progress, sensitivities: Mapping[int, float]) -> list[PairPlan]:
    """Each measurable pair's elimination (every k's error) and the sensitivity that prices it (its down layer's,
    from `sensitivities` by group; a Q·Kᵀ pair's own, measured here); returns those pairs."""
    plans = measurable(plan, plans, runner)
    correlations = _correlations(plan, plans, runner, batches, progress)
    reference = None
    for pair_plan in progress(plans, "joint pairs"):
        pair_plan.elimination = pair_plan.pair.eliminate(correlations[id(pair_plan)])
        if isinstance(pair_plan.pair, scores.ScorePair):
            if reference is None:
                reference = calibration.model_outputs(runner, _sensitivity_batches(batches))
            pair_plan.sensitivity = _own_sensitivity(pair_plan, runner, batches, reference)
        else:
            pair_plan.sensitivity = sensitivities.get(id(pair_plan.down))
    return plans


def _sensitivity_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return datafit.first_samples(batches, datafit.SENSITIVITY_SAMPLES)


def _own_sensitivity(pair_plan: PairPlan, runner: CalibrationRunner, batches: list[dict[str, np.ndarray]],
                     reference: dict[str, np.ndarray]) -> float:
    """The model's relative output error per unit of the pair's predicted error, with the pair alone fitted
    at half its width (as datafit.measure_sensitivity probes a layer at half its parameters)."""
    keep = max(1, pair_plan.width // 2)
    assert pair_plan.elimination is not None  # measure() eliminated it first
    predicted = pair_plan.elimination.error(keep)
    if predicted <= 0:
        return 0.0
    outputs = calibration.model_outputs(runner, _sensitivity_batches(batches),
                                        pair_plan.feeds_of(pair_plan.elimination.fit(keep), runner))
    return datafit.relative_error(reference, outputs) / predicted


def settle(plan: Plan, plans: Sequence[PairPlan], settings: Settings, runner: CalibrationRunner,
           batches: list[dict[str, np.ndarray]], measured: Measured | None = None,
           sensitivities: Mapping[int, float] | None = None) -> None:
    """After a budget allocation: each pair takes its joint fit at the k it was given, or the best
    per-matrix plan of its two layers at the same cost, whichever loses less on calibration samples.
    `measured`: --objective latency's times and ladders (the per-matrix plans allocate over them)."""
    assert settings.budget is not None
    measure_name, _ = settings.budget
    flag = "--" + settings.budget_setting.replace("_", "-")
    comparison = Comparison(runner, datafit.first_samples(batches, COMPARISON_SAMPLES))
    for pair_plan in plans:
        keep = pair_plan.keep if pair_plan.keep is not None else pair_plan.width
        if keep >= pair_plan.width:
            for group in pair_plan.groups:
                if not plan[group].reason:  # a layer that could not be timed (--objective latency) keeps saying so
                    plan.keep_dense(group, "kept_dense_by_budget", f"kept dense by the {flag} allocation")
            continue
        assert pair_plan.elimination is not None  # the units settle() is given were measured (measure())
        fit = pair_plan.elimination.fit(keep)
        share = pair_plan.cost(keep, measure_name) / pair_plan.cost(pair_plan.width, measure_name)
        if not _plan_per_matrix(plan, pair_plan, settings, share, measured, sensitivities):
            pair_plan.take(fit, plan)  # no per-matrix plan fits the pair's share of the budget
            continue
        pair_plan.svd_error, pair_plan.joint_error = _errors(plan, pair_plan, fit, comparison)
        if pair_plan.joint_error <= pair_plan.svd_error:
            pair_plan.take(fit, plan)
    logger.info("joint pairs: %d of %d chosen over per-matrix factorization", sum(p.chosen for p in plans), len(plans))


def _plan_per_matrix(plan: Plan, pair_plan: PairPlan, settings: Settings, fraction: float, measured: Measured | None,
                     sensitivities: Mapping[int, float] | None) -> bool:
    """The two layers planned alone on the pair's share of the budget; False when no rank fits it."""
    assert settings.budget is not None
    local = settings.with_budget(fraction, settings.budget[0])
    try:
        planning.allocate_budget(plan, pair_plan.groups, local, measured=measured, sensitivities=sensitivities)
    except OnnxlrError:  # the rank multiple in both layers is over the pair's share
        return False
    for group in pair_plan.groups:
        if plan.factorized(group):
            planning.apply_break_even(plan, group, local)
    return True


def choose(plan: Plan, plans: list[PairPlan], runner: CalibrationRunner, batches: list[dict[str, np.ndarray]],
           progress: Progress) -> None:
    """Per-layer policies: fit each pair at its per-matrix plan's weight parameters; keep it where it loses less."""
    plans = [p for p in measurable(plan, plans, runner) if any(plan.factorized(g) for g in p.groups)]
    if not plans:
        return
    correlations = _correlations(plan, plans, runner, batches, progress)
    comparison = Comparison(runner, datafit.first_samples(batches, COMPARISON_SAMPLES))
    for pair_plan in progress(plans, "joint pairs"):
        pair = pair_plan.pair
        # Weights only, as the per-matrix plan's figure counts them (the biases stay either way).
        planned = sum(_weight_params_after(plan[g], g) for g in pair_plan.groups)
        keep = min(pair.width, max(1, planned // pair.weights_per_neuron))
        if keep >= pair.width:
            continue
        fit = pair.fit_at(correlations[id(pair_plan)], keep)
        pair_plan.svd_error, pair_plan.joint_error = _errors(plan, pair_plan, fit, comparison)
        if pair_plan.joint_error < pair_plan.svd_error:
            pair_plan.take(fit, plan)
    chosen = sum(p.chosen for p in plans)
    logger.info("joint pairs: %d of %d chosen over per-matrix factorization", chosen, len(plans))


def _weight_params_after(decision: Decision, group: WeightGroup) -> int:
    """The group's weight parameters under the per-matrix plan (the bias left out: it stays either way)."""
    scheme = decision.scheme or group.schemes[0]
    if decision.factorized:
        assert decision.rank is not None  # factorized: planned to a rank
        return decision.rank * scheme.params_per_rank
    return scheme.params_before - scheme.fixed_params


def _correlations(plan: Plan, plans: list[PairPlan], runner: CalibrationRunner, batches: list[dict[str, np.ndarray]],
                  progress: Progress) -> dict[int, Any]:
    """Each pair's augmented correlation Σ [z,1][z,1]ᵀ of its down layer's input: from the statistics
    calibration already took (the down layer's Gram and sum), or from a pass of its own."""
    result: dict[int, Any] = {}
    for pair_plan in plans:
        if isinstance(pair_plan.pair, scores.ScorePair):  # the query's and the key's inputs (measurable has them)
            result[id(pair_plan)] = (_augmented(plan.svd.statistics(pair_plan.ups[0])),
                                     _augmented(plan.svd.statistics(pair_plan.down)))
        elif _has_moments(plan.svd.statistics(pair_plan.down)):
            result[id(pair_plan)] = _augmented(plan.svd.statistics(pair_plan.down))
    missing = [p for p in plans if id(p) not in result]
    if not missing:
        return result
    grams = {id(p): joint.AugmentedGram() for p in missing}
    names = [runner.probes[p.key].activation for p in missing]
    for batch in progress(batches, "joint statistics"):
        outputs = runner.run(batch, names)
        keep = runner.keep(batch)
        for pair_plan in missing:
            grams[id(pair_plan)].add(runner.vectors(pair_plan.key, outputs, keep))
    result.update({key: gram.result() for key, gram in grams.items()})
    return result


def _has_moments(statistics: Statistics) -> bool:
    """Whether calibration left a group's original input statistics (one conv group): Gram and sum."""
    return statistics.original_moments


def _augmented(statistics: Statistics) -> np.ndarray | None:
    """[[G, s], [sᵀ, n]] from a group's original input statistics (one conv group), or None."""
    if not _has_moments(statistics):
        return None
    assert statistics.input_moments is not None  # original_moments checked it
    sums, count = statistics.input_moments
    sums = sums.reshape(-1)
    width = len(sums)
    augmented = np.empty((width + 1, width + 1))
    augmented[:width, :width] = statistics.gram
    augmented[:width, width] = augmented[width, :width] = sums
    augmented[width, width] = count
    return augmented


@dataclasses.dataclass
class Comparison:
    """The calibration samples a pair's two plans are compared on, and the model's outputs there (once)."""

    runner: CalibrationRunner
    batches: list[dict[str, np.ndarray]]
    _reference: dict[str, np.ndarray] | None = None

    @property
    def reference(self) -> dict[str, np.ndarray]:
        if self._reference is None:
            self._reference = calibration.model_outputs(self.runner, self.batches)
        return self._reference

    def model_error(self, overrides: dict[int, np.ndarray]) -> float:
        return datafit.relative_error(self.reference, calibration.model_outputs(self.runner, self.batches, overrides))


def _errors(plan: Plan, pair_plan: PairPlan, fit: PairFit, comparison: Comparison) -> tuple[float, float]:
    """Relative output error of the pair's down layer (of the model, for a Q·Kᵀ pair: it has no down
    layer whose outputs show its error): per-matrix plan, and joint fit (same samples)."""
    pair, runner, batches = pair_plan.pair, comparison.runner, comparison.batches
    if isinstance(pair, scores.ScorePair):
        per_matrix = {cast(int, runner.feed(g)): plan.planned_weight(g)  # measurable: every layer has its feed
                      for g in pair_plan.groups if plan.factorized(g)}
        return comparison.model_error(per_matrix), comparison.model_error(pair_plan.feeds_of(fit, runner))
    pair = cast("DownPairKind[Any]", pair)  # every kind but Q·Kᵀ has a down layer
    down_matrix = pair.down_matrix().astype(np.float64)
    down_bias = pair.down_bias()
    bias = np.zeros(down_matrix.shape[1]) if down_bias is None else down_bias.astype(np.float64)
    down = pair_plan.down
    svd_down = _as_matrix(pair.down, plan.planned_weight(down)) if plan.factorized(down) else down_matrix
    overrides = {cast(int, runner.feed(g)): plan.planned_weight(g)  # measurable: every layer has its feed
                 for g in pair_plan.ups if plan.factorized(g)}
    name = runner.probes[pair_plan.key].activation
    fit_down, fit_bias = pair.effective_down(fit)
    fit_bias = np.zeros_like(bias) if fit_bias is None else fit_bias
    reference = svd = joint_loss = 0.0
    for batch in batches:
        keep = runner.keep(batch)
        z = _rows(runner.vectors(pair_plan.key, runner.run(batch, [name]), keep))
        z_svd = _rows(runner.vectors(pair_plan.key, runner.run(batch, [name], overrides), keep))
        y = z @ down_matrix + bias
        reference += float(np.sum(y**2))
        svd += float(np.sum((z_svd @ svd_down + bias - y) ** 2))
        joint_loss += float(np.sum((z @ fit_down + fit_bias - y) ** 2))
    scale = max(reference, np.finfo(np.float64).tiny)
    return svd / scale, joint_loss / scale


def _rows(vectors: np.ndarray) -> np.ndarray:
    """Activation vectors as (n, K) float64 (a conv's patches come as (1, n, K))."""
    return np.asarray(vectors, dtype=np.float64).reshape(-1, np.shape(vectors)[-1])


def _as_matrix(layer: pairs.Linear | conv_pairs.ConvLayer, stored: np.ndarray) -> np.ndarray:
    """A weight as its layer stores it (Gemm transB, conv OIHW), as the X·W matrix."""
    stored = np.asarray(stored, dtype=np.float64)
    if isinstance(layer, conv_pairs.ConvLayer):
        return stored.reshape(stored.shape[0], -1).T
    return stored.T if layer.transposed else stored


# ----------------------------------------------------------------------------- rewrite


def rewrite(model: ir.Model, plans: Sequence[PairPlan], sink: WeightSink | None = None) -> None:
    """Slice the chosen pairs' weights and biases to their kept neurons; no node is added."""
    names = NameGenerator(model)
    for pair_plan in plans:
        if pair_plan.fit is None:  # not chosen
            continue
        slices = list(pair_plan.pair.fit_slices(pair_plan.fit))
        unit = cast(str, slices[0][0].name) if slices else ""  # the pair's name: its first narrowed node's
        for node, old, array in slices:
            _replace(node, old, array, names, sink)
            node.metadata_props[JOINT_UNIT] = unit  # what onnxlr.factorize.revert puts back together
        for value in pair_plan.pair.inner_values():  # k, not D, neurons now: drop the recorded shapes
            value.shape = None


def _replace(node: ir.Node, old: ir.Value, array: np.ndarray, names: NameGenerator, sink: WeightSink | None) -> None:
    """Give `node` a new initializer in place of its constant input `old` (cleanup drops the old one)."""
    tensor = ir.convenience.get_const_tensor(old)
    assert tensor is not None and node.graph is not None  # a constant input (the finders checked) of a model's node
    value = add_initializer(node.graph, names(f"{old.name or node.name}_joint"), array, tensor.dtype, sink)
    index = next(i for i, v in enumerate(node.inputs) if v is old)
    node.replace_input_with(index, value)
