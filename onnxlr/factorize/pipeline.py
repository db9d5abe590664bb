"""The optimize pipeline: find targets -> plan -> rewrite -> clean up, on an in-memory onnx-ir model.

`onnxlr.optimize` (onnxlr.api) and `onnxlr optimize` (the CLI) both run a job (onnxlr.job: memory plan, this
factorization, writing, verification, gate), whose factorization is `optimize_loaded`, the one place that reads
calibration data; `factorize_model` runs the stages
and returns a typed result (`Factorization`: the report and the per-node costs). With calibration
data it also runs the data-aware steps of onnxlr.calibrate.datafit (statistics, sensitivity, target search,
compensation) between planning and the rewrite.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from onnxlr.calibrate import datafit
from onnxlr.calibrate.calibration import Runner
from onnxlr.coupled import plans as coupled
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import cost, lowrank, quantize, rewrite, subnormals
from onnxlr.factorize import plan as planning
from onnxlr.factorize.decisions import Plan
from onnxlr.factorize.groups import WeightGroup
from onnxlr.factorize.results import Report, build_report
from onnxlr.factorize.svd import Statistics, SvdCache
from onnxlr.factorize.targets import attach_statistics, find_targets
from onnxlr.model_io.inputs import load_batches
from onnxlr.model_io.io import LoadedModel, first_line, load
from onnxlr.model_io.shapes import default_opset, infer_shapes
from onnxlr.passes import Context
from onnxlr.passes.base import inputs_are_weights
from onnxlr.policies import DEFAULT_RANK_RATIO, RankRatio, SizeBudget
from onnxlr.protocols import WeightSink
from onnxlr.settings import Progress, Settings, no_progress
from onnxlr.timing import latency

logger = logging.getLogger(__name__)

# --quantize with --target-cosine/--target-error: searches until the written, quantized model meets the goal.
QUANTIZED_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class Planned:
    """What planning with data measured beside the plan: the report's `calibration` section (None without
    calibration data) and each group's sensitivity (by id; only when a whole-model plan measured them)."""

    calibration: dict[str, Any] | None = None
    sensitivities: Mapping[int, float] = dataclasses.field(default_factory=dict)
    quantizer: quantize.QuantizerLoss | None = None  # --quantize with a goal: the quantizer's loss it planned for


@dataclasses.dataclass
class Factorization:
    """What factorize_model returns: the report, the cost model's per-node figures (edge estimates) and, for
    --quantize with a goal, the quantizer's loss the plan made room for."""

    report: Report
    costs_before: list[cost.NodeCost]
    costs_after: list[cost.NodeCost] | None  # None for a dry run
    quantizer: quantize.QuantizerLoss | None = None


# ----------------------------------------------------------------------------- entry points


def optimize_loaded(loaded: LoadedModel, settings: Settings, *, source: Any, calibration: Any = None,
                    calibration_samples: int | None = None, heldout: Any = None, batch_size: int = 16,
                    progress: Progress | None = None, dry_run: bool = False,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, sink: WeightSink | None = None,
                    calibration_segment_budget: int | None = None) -> Factorization:
    """Read the calibration data (if any) against the original, then factorize `loaded.model` in place.

    `source` is what the caller loaded (a path, or an in-memory model): onnxruntime runs the
    original from its file, so external data is read beside it, or from a serialized copy.
    `calibration_segment_budget` (bytes of weights): collect the statistics block by block, for a model that does
    not fit in memory (datafit.CalibrationData.segment_budget).
    """
    data = calibration_data(loaded, source, calibration, calibration_samples, heldout, batch_size,
                            calibration_segment_budget)
    if settings.quantize == "int8-static" and data is None:
        raise OnnxlrError("{0} int8-static needs calibration data ({1})", "quantize", "calibration")
    if settings.correction_rank and data is None:  # said before any layer is factorized
        raise OnnxlrError("{0} needs calibration data ({1}): the correction is fitted on the activations",
                          "correction_rank", "calibration")
    if settings.quantize == "auto":
        return optimize_precision(loaded, settings, data, progress, dry_run, input_shapes)
    goal = datafit.Goal.of(settings)
    confirming = settings.objective == "latency" and settings.latency_table is None and not dry_run
    quantizer = quantize.QuantizerLoss()
    for attempt in range(1, QUANTIZED_ATTEMPTS + 1):
        # The quantizer reads the whole model, and a latency plan may put layers back: factors stay in memory for
        # them rather than going to `sink` (where a reverted layer's factors would stay in the file).
        result = factorize_model(loaded.model, settings, progress=progress, dry_run=dry_run,
                                 input_shapes=input_shapes, calibration_data=data,
                                 sink=None if settings.quantize or confirming else sink, quantizer=quantizer)
        if confirming:
            confirm_end_to_end(loaded, source, result, settings, data, input_shapes)
        if not settings.quantize or dry_run:
            return result
        loaded.model, stage = quantize.quantize_stage(loaded.model, settings, data, goal,
                                                      result.report.totals["bytes_after"])
        result.report.quantization = {**stage, "attempts": attempt}
        if stage["bytes_after"] > result.report.totals["bytes_before"] and not settings.allow_no_gain:
            raise OnnxlrError(f"the quantized model with its corrections would take {stage['bytes_after']} bytes of "
                              f"weights, more than the input's {result.report.totals['bytes_before']}: give a smaller "
                              "{0} (nothing was written)", "correction_rank")
        final = stage.get("final")
        if final is None or final["met"] or attempt == QUANTIZED_ATTEMPTS:
            return result
        # The losses did not add up as the search assumed: search again from the original, aiming past
        # what the quantizer added beyond its loss on the original.
        assert data is not None and goal is not None and result.quantizer is not None  # a goal's final figure
        quantizer = dataclasses.replace(result.quantizer,
                                        extra=result.quantizer.extra + quantize.missed_by(goal, final[goal.metric]))
        logger.warning("the quantized model missed %s (%.4f): searching again with a stricter low-rank goal",
                       goal, final[goal.metric])
        loaded.model = quantize.load_source(data.source)
    return result


def optimize_precision(loaded: LoadedModel, settings: Settings, data: datafit.CalibrationData | None,
                       progress: Progress | None, dry_run: bool, input_shapes: Mapping[str, Sequence[int]] | None
                       ) -> Factorization:
    """--quantize auto: every layer stays dense (the report says why), then onnxlr.factorize.precision plans and
    writes each weight's precision and correction."""
    from onnxlr.factorize import precision

    if not isinstance(settings.policy, SizeBudget) and settings.goal is None:
        raise OnnxlrError("{0} auto needs a goal: {1}, {2}, {3} or {4} (with held-out {5}), or {6}", "quantize",
                          "target_cosine", "target_error", "target_top1", "target_neighbours", "heldout", "size_budget")
    if data is None:
        raise OnnxlrError("{0} auto needs calibration data ({1}): each layer's error is measured on it", "quantize",
                          "calibration")
    dense = dataclasses.replace(settings, policy=RankRatio(DEFAULT_RANK_RATIO))  # selection keeps every layer
    result = factorize_model(loaded.model, dense, progress=progress, dry_run=dry_run, input_shapes=input_shapes)
    if dry_run:
        return result
    size_budget = settings.policy.value if isinstance(settings.policy, SizeBudget) else None
    loaded.model, stage = precision.auto_stage(loaded.model, data, settings.quantize_block, datafit.Goal.of(settings),
                                               size_budget, progress or no_progress)
    result.report.quantization = {**stage, "bytes_low_rank": result.report.totals["bytes_after"], "attempts": 1}
    if stage["bytes_after"] > result.report.totals["bytes_before"] and not settings.allow_no_gain:
        raise OnnxlrError(f"the planned model would take {stage['bytes_after']} bytes of weights, more than the "
                          f"input's {result.report.totals['bytes_before']} (nothing was written)")
    return result


def confirm_end_to_end(loaded: LoadedModel, source: Any, result: Factorization, settings: Settings,
                       data: datafit.CalibrationData | None, input_shapes: Mapping[str, Sequence[int]] | None
                       ) -> None:
    """--objective latency: time the rewritten model against its input, whole, and put back the layers that do not
    pay there (onnxlr.timing.confirm); the report's rows, totals, costs and `latency.end_to_end` say what was done."""
    from onnxlr.timing import confirm

    if not result.report.modified:
        return
    original, reference, folder = _original(loaded, source)
    logger.info("timing the rewritten model against the original, end to end")
    try:
        feeds = confirm.feeds_for(original, reference, data.batches if data is not None else None, input_shapes)
        outcome = confirm.confirm_latency(original, reference, loaded.model, feeds, settings.latency_provider,
                                          settings.latency_threads, external_data_folder=folder)
    except (OnnxlrError, MemoryError):
        raise
    except Exception as exc:  # onnxruntime's own errors: the model does not run whole on these inputs
        raise OnnxlrError(f"--objective latency confirms its plan by timing the whole model, and onnxruntime "
                          f"cannot run it: {first_line(exc)} (nothing was written)") from exc
    report = result.report
    if outcome.reverted:
        report.mark_reverted(outcome.reverted, cost.model_totals(loaded.model))
        if report.totals["bytes_after"] > report.totals["bytes_before"] and not settings.allow_no_gain:
            # Units keep a shared weight's readers together, so this is a bug; and nothing is written.
            raise RuntimeError("putting layers back made the model larger than its input; nothing was written")
        result.costs_after = cost.model_costs(loaded.model, infer_shapes(loaded.model, input_shapes))
        report.cost["after"] = cost.totals(result.costs_after, loaded.model)
        report.totals["subnormals_flushed"] = subnormals.model_flushed(loaded.model)
    report.latency = {**(report.latency or {}), "end_to_end": outcome.to_json()}
    speed = outcome.speed
    if not report.modified:
        logger.warning("no rewrite paid in the whole model (%.2fx end to end before putting them back): the "
                       "model is written as it was", (outcome.first_speed or speed).speedup)


def _original(loaded: LoadedModel, source: Any) -> tuple[ir.Model, Any, os.PathLike | None]:
    """The caller's model loaded again (read only: the caller's object is never modified), what onnxruntime runs it
    from (its path, else its bytes), and the folder its external data lies in (None when it has none)."""
    from onnxlr.timing.confirm import session_source

    original = load(source).model
    reference = source if isinstance(source, (str, os.PathLike)) else session_source(original)
    folder = loaded.path.parent if loaded.path is not None and loaded.uses_external_data else None
    return original, reference, folder


def calibration_data(loaded: LoadedModel, source: Any, calibration: Any, samples: int | None, heldout: Any,
                     batch_size: int = 16, segment_budget: int | None = None) -> datafit.CalibrationData | None:
    """Calibration batches (and held-out batches for the target search), read before the model is rewritten.
    `segment_budget`: collect the statistics block by block (datafit.CalibrationData.segment_budget)."""
    if calibration is None:
        if samples is not None:
            raise OnnxlrError("{0} needs {1}", "calibration_samples", "calibration")
        return None
    if isinstance(source, (str, os.PathLike)):
        model_source: str | os.PathLike | bytes = source
    else:
        model_source = ir.to_proto(loaded.model).SerializeToString()
    return datafit.CalibrationData(
        source=model_source,
        batches=load_batches(loaded.model, calibration, samples, batch_size),
        heldout=load_batches(loaded.model, heldout, batch_size=batch_size) if heldout is not None else None,
        segment_budget=segment_budget,
    )


# ----------------------------------------------------------------------------- the stages


def factorize_model(model: ir.Model, settings: Settings, progress: Progress | None = None,
                    dry_run: bool = False, input_shapes: Mapping[str, Sequence[int]] | None = None,
                    statistics: Mapping[str, np.ndarray] | None = None,
                    calibration_data: datafit.CalibrationData | None = None, sink: WeightSink | None = None,
                    quantizer: quantize.QuantizerLoss | None = None) -> Factorization:
    """Factorize `model` in place (unless `dry_run`): find targets, plan, rewrite, clean up.

    `sink` (onnxlr.model_io.save.DataFile): the output's external-data file; each layer's factors are written
    there as soon as they exist, so they never accumulate in memory.

    `calibration_data`: the original model's source and calibration batches (onnxlr.calibrate.datafit); the
    targets then get the activation-whitened SVD, `--param-budget` allocates by measured
    sensitivity, and `compensate` / `target_cosine` become available; `quantizer`: with --quantize and a goal, the
    quantizer's loss known from an earlier attempt. `statistics` (Gram matrices
    by target output name, onnxlr.calibrate.calibration.collect_grams) gives the whitened SVD alone.
    """
    progress = progress or no_progress
    totals_before = cost.model_totals(model)
    context = Context(shapes=infer_shapes(model, input_shapes), opset=default_opset(model),
                      inputs_as_constants=inputs_are_weights(model, settings.inputs_as_constants))
    costs_before = cost.model_costs(model, context.shapes)
    cost_report = {"before": cost.totals(costs_before, model)}
    # Graph order (subgraph nodes follow their parent), taken before the rewrite removes nodes.
    order = {id(node): index for index, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph))}
    groups, skipped = find_targets(model, settings, context)
    pair_plans, not_pairs = _joint_candidates(model, groups, settings, calibration_data)
    runner = None
    measured: Mapping[int, Statistics] = {}  # the calibration stage's statistics, by group
    if calibration_data is not None:
        extra = coupled.bias_slots(pair_plans)
        calibrated = datafit.prepare(model, groups, calibration_data, progress, [slot for _, _, slot in extra])
        runner, measured = calibrated.runner, calibrated.statistics
        if runner is not None:
            coupled.attach_bias_slots(extra, runner)
    elif statistics:
        measured = attach_statistics(groups, statistics)
    plan = Plan(groups, SvdCache(settings.solver, measured))
    _check_data_needs(settings, runner, calibration_data)
    clock = _clock(model, settings, context, input_shapes, calibration_data)
    # Per-layer policies plan each layer on its own, inside the streaming loop; whole-model budgets,
    # calibration runs and latency planning (timing wants the cores to itself) plan every layer first.
    per_layer = runner is None and settings.budget is None and clock is None
    planned = Planned()
    with lowrank.one_blas_thread():  # the same factors whatever --jobs and the core count
        if not per_layer:
            planned = plan_with_data(model, plan, groups, settings, progress, runner, calibration_data, pair_plans,
                                     clock, quantizer)
        rewrite.factorize_groups(model, plan, groups, settings, progress, plan_here=per_layer, dry_run=dry_run,
                                 sink=sink)
    calibration_report = planned.calibration
    if calibration_report is not None and (pair_plans or not_pairs):
        calibration_report["pairs"] = coupled.summary(pair_plans, not_pairs)
    costs_after = None
    if not dry_run:
        coupled.rewrite(model, pair_plans, sink)
        rewrite.cleanup(model, plan, groups)
        rewrite.record_metadata(model, settings, plan, groups)
        costs_after = cost.model_costs(model, infer_shapes(model, input_shapes))
        cost_report["after"] = cost.totals(costs_after, model)
    totals_after = cost.model_totals(model) if not dry_run else None
    if totals_after is not None and totals_after["bytes"] > totals_before["bytes"] and not settings.allow_no_gain:
        # Each group's rewrite already checked its own bytes; growth here is a bug, and nothing is written.
        raise RuntimeError(f"the rewritten model would be larger than its input ({totals_before['bytes']} -> "
                           f"{totals_after['bytes']} bytes of weights); nothing was written")
    report = build_report(plan, groups, skipped, settings.as_dict(), order, totals_before, totals_after, cost_report,
                          calibration_report, clock.measured if clock is not None else None, planned.sensitivities)
    if not dry_run:  # values set to zero in what onnxlr wrote (onnxlr.factorize.subnormals)
        report.totals["subnormals_flushed"] = subnormals.model_flushed(model)
    if clock is not None:
        report.latency = latency.plan_summary(plan, groups, clock)
    return Factorization(report=report, costs_before=costs_before, costs_after=costs_after,
                         quantizer=planned.quantizer)


def _clock(model: ir.Model, settings: Settings, context: Context, input_shapes: Mapping[str, Sequence[int]] | None,
           data: datafit.CalibrationData | None) -> latency.Clock | None:
    """--objective latency: the clock that times candidates at the shapes the model sees (--shape, else the first
    calibration batch's)."""
    if settings.objective != "latency":
        return None
    shapes = context.shapes
    if not input_shapes and data is not None and data.batches:
        shapes = infer_shapes(model, {name: array.shape for name, array in data.batches[0].items()
                                      if name in {v.name for v in model.graph.inputs}})
    clock = latency.Clock(shapes, settings.latency_provider, settings.latency_threads, settings.latency_table,
                          settings.latency_cache)
    clock.dynamic_inputs = latency.dynamic_inputs(model, shapes)
    return clock


def _joint_candidates(model: ir.Model, groups: list[WeightGroup], settings: Settings,
                      data: datafit.CalibrationData | None) -> tuple[list[coupled.PairPlan], list[dict[str, str]]]:
    """The coupled pairs joint compression may take, and the candidates that are not pairs (with why).

    By default (methods None) every pair when there is calibration data; with `--methods svd,joint`
    the same, and a warning (once) when there is none."""
    if settings.methods is not None and "joint" not in settings.methods:
        return [], []
    if data is None:
        if settings.methods is not None:
            logger.warning("--methods joint needs --calibration data (the refit reads the activations): "
                           "per-matrix factorization only")
        elif found := coupled.find(model, groups)[0]:
            logger.info("%d coupled pairs could be compressed jointly with --calibration data", len(found))
        return [], []
    plans, not_pairs = coupled.find(model, groups)
    if plans and data.segment_budget is not None:
        logger.warning("%d coupled pairs are factorized per matrix: choosing a joint fit compares whole-model runs, "
                       "and the model does not fit in memory whole", len(plans))
        return [], not_pairs
    for entry in not_pairs:
        logger.info("not a coupled pair at %s: %s", entry["node"], entry["reason"])
    return plans, not_pairs


def _check_data_needs(settings: Settings, runner: Runner | None, data: datafit.CalibrationData | None) -> None:
    goal = settings.goal
    for name, wanted in ((goal.keyword if goal is not None else "", goal is not None),
                         ("compensate", settings.compensate)):
        if wanted and data is None:
            raise OnnxlrError("{0} needs calibration data ({1})", name, "calibration")
        if wanted and runner is None:
            raise OnnxlrError("{0}: no factorizable layer of the main graph can be calibrated", name)


def plan_with_data(model: ir.Model, plan: Plan, groups: list[WeightGroup], settings: Settings, progress: Progress,
                   runner: Runner | None, data: datafit.CalibrationData | None,
                   pair_plans: Sequence[coupled.PairPlan] = (), clock: latency.Clock | None = None,
                   quantizer: quantize.QuantizerLoss | None = None) -> Planned:
    """Plan ranks into `plan`; with calibration, also measure sensitivity, search the budget, choose joint pairs and
    compensate. `clock`: plan by measured latency (onnxlr.timing.latency); `quantizer`: --quantize with a goal, the
    quantizer's loss known from an earlier attempt."""
    if runner is None:
        planning.plan_ranks(plan, groups, settings, progress, clock=clock)
        return Planned()
    assert data is not None
    result: dict[str, Any] = {"samples": data.samples, "compensate": settings.compensate}
    goal = datafit.Goal.of(settings)
    if goal is not None and settings.quantize:  # the budget pays for both errors
        goal, result["quantizer"], quantizer = quantize.low_rank_goal(goal, settings.quantize, data,
                                                                      quantizer or quantize.QuantizerLoss(),
                                                                      settings.quantize_block,
                                                                      settings.quantize_symmetric)
    else:
        quantizer = None
    whole_model = settings.budget is not None or goal is not None
    sensitivities = (datafit.measure_sensitivity(plan, groups, runner, data,
                                                 lambda g: planning.candidate_schemes(plan, g, settings)[0], progress)
                     if whole_model else {})
    units = (coupled.measure(plan, pair_plans, runner, data.batches, progress, sensitivities)
             if whole_model and pair_plans else [])
    initial = plan.snapshot()  # nothing planned yet: each trial of the search starts here again

    def restore(resetting: Sequence[coupled.PairPlan] = units) -> None:
        for unit in resetting:
            unit.reset(plan)
        plan.restore(initial)  # the pairs that declined keep what they were

    def plan_budget(budget_settings: Settings, bars: Progress) -> None:
        """Allocate with the pairs as candidates; a pair that settles for its per-matrix plan leaves the
        candidates and the allocation runs again, so its layers compete on their own curves."""
        candidates = list(units)
        for unit in units:
            unit.reset(plan)
        while True:
            restore(candidates)  # the pairs that declined keep their comparison for the report
            planning.plan_ranks(plan, groups, budget_settings, bars, cast(Sequence[planning.JointUnit], candidates),
                                clock, sensitivities)
            bars = no_progress
            if not candidates:
                return
            coupled.settle(plan, candidates, budget_settings, runner, data.batches,
                           clock.measured if clock is not None else None, sensitivities)
            declined = [u for u in candidates if not u.chosen and u.keep is not None and u.keep < u.width]
            if not declined:
                return
            candidates = [u for u in candidates if u not in declined]

    if goal is not None:
        def plan_for(budget: float | None) -> None:
            if budget is None:
                restore()
                for group in groups:
                    if not plan[group].reason:
                        plan.keep_dense(group, "target_not_reached", f"kept dense: no budget reaches {goal}")
                return
            plan_budget(settings.with_budget(budget),
                        no_progress)  # each trial: no bars

        result["search"] = datafit.search_budget(plan, groups, goal, runner, data, plan_for, progress)
    elif settings.budget is not None:
        plan_budget(settings, progress)
    else:
        planning.plan_ranks(plan, groups, settings, progress, clock=clock)
        if pair_plans:
            coupled.choose(plan, list(pair_plans), runner, data.batches, progress)
    if settings.compensate:
        result["refitted"] = datafit.compensate(model, plan, groups, runner, data, progress)
    return Planned(calibration=result, sensitivities=sensitivities, quantizer=quantizer)
