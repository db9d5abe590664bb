"""Memory planning before verification and calibration (what `optimize` and `verify` check first).

Verification runs the models whole when they fit and are small, else in segments (onnxlr.verification.segments); calibration
runs the original whole when it fits beside its Gram matrices, else block by block, where few samples of a wide
activation stay on disk (onnxlr.calibrate.calibration.SampleAccumulator). What cannot fit stops with one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What the memory check decided: run verification and calibration whole (None) or in segments of at most so
    many bytes of weights; `calibration_batches`, the calibration file when the check already read it."""

    segment_budget: int | None = None  # verification
    calibration_segment_budget: int | None = None  # calibration statistics, block by block
    calibration_batches: list | None = None


def check_memory(loaded: Any, input_shapes: dict, *, batch_size: int, samples: int, inputs_given: bool,
                 verifying: bool, calibration: tuple | None = None, config: Any = None) -> MemoryPlan:
    """Before hours are spent: the original's onnxruntime session (verification runs one model at a time, and the
    rewritten one is never larger) must fit the memory available, at the batch the runs use.

    `inputs_given`: verification reads an inputs file (batches of `batch_size`), else synthesizes `samples`;
    `calibration`: (its path, --calibration-samples)."""
    calibrating = calibration is not None
    if not (verifying or calibrating):
        return MemoryPlan()
    from onnxlr.factorize import cost
    from onnxlr.model_io.shapes import infer_shapes
    from onnxlr.verification import memory

    batch = batch_size if inputs_given or calibrating else min(samples, batch_size)
    shapes = infer_shapes(loaded.model, {name: (min(dims[0], batch), *dims[1:]) if dims else dims
                                         for name, dims in input_shapes.items()})
    weights = cost.model_totals(loaded.model)["bytes"]
    scale = batch if not input_shapes else 1
    activations = memory.peak_activation_bytes(loaded.model, shapes) * scale
    free = memory.available()
    if free is not None and memory.input_bytes(loaded.model, shapes) * scale > free.bytes:
        return MemoryPlan()  # the inputs alone cannot exist: the input stage names the one at fault, more precisely
    segment_budget = plan_verification(weights, activations, free) if verifying else None
    calibration_budget, batches = (plan_calibration(loaded.model, shapes, weights, activations, free, config,
                                                    batch_size, calibration) if calibration is not None
                                   else (None, None))
    return MemoryPlan(segment_budget=segment_budget, calibration_segment_budget=calibration_budget,
                      calibration_batches=batches)


def plan_verification(weights: int, activations: float, free: Any) -> int | None:
    """Whole models when they fit and are small; else in segments of consecutive nodes (onnxlr.verification.segments), one at a
    time: peak memory follows one segment, and the comparison is still of the models' outputs."""
    from onnxlr.verification import memory

    fits = memory.fits(weights, activations, free)
    if fits and weights <= memory.SEGMENTED_ABOVE_BYTES:
        return None
    budget = memory.segment_budget(activations, free)
    memory.check("verification", weights if budget is None else 0, activations, "pass --no-verify, or a smaller "
                 "--batch-size / --samples", free)
    # No budget means no segment fits, and then neither does the whole model: check() has stopped the run.
    assert budget is not None
    log = logging.getLogger("onnxlr")
    if not fits:
        assert free is not None  # unknown memory always "fits"
        log.warning("verification: onnxruntime would need about %s for the whole model, %s is available (%s): "
                    "verifying in segments of at most %s of weights, one at a time",
                    memory.gb(memory.session_bytes(weights, activations)), memory.gb(free.bytes), free.source,
                    memory.gb(budget))
    else:
        log.info("verification: %s of weights (over %s): verifying in segments of at most %s of weights, one at a "
                 "time", memory.gb(weights), memory.gb(memory.SEGMENTED_ABOVE_BYTES), memory.gb(budget))
    return budget


def plan_calibration(model: Any, shapes: dict, weights: int, activations: float, free: Any, config: Any,
                     batch_size: int, data: tuple) -> tuple[int | None, list | None]:
    """The whole original in one session when it fits beside its Gram matrices (K x K float64 per activation);
    else its statistics block by block (segments), where an activation seen by fewer vectors than half its width
    keeps them on disk instead of a Gram, and the steps that run the whole model (sensitivity, target search,
    compensation, static quantization) are refused. `data`: (calibration path, --calibration-samples).
    Returns the segment budget (None: whole) and the batches when they were read here."""
    from onnxlr.calibrate.calibration import statistics_bytes
    from onnxlr.factorize.targets import selected
    from onnxlr.verification import memory

    def wanted(probe: Any) -> bool:
        return probe.op in config.ops and selected(probe.node, config)

    held, working = statistics_bytes(model, shapes, wanted)
    if free is None or memory.session_bytes(weights, activations) + held + working <= free.bytes:
        return None, None
    whole = [flag for flag, asked in (("--param-budget/--mac-budget", config.budget is not None),
                                      ("--target-cosine/--target-error", config.goal is not None),
                                      ("--compensate", config.compensate),
                                      ("--quantize int8-static", config.quantize == "int8-static")) if asked]
    batches = None
    if not whole:
        from onnxlr.model_io.inputs import load_batches

        # Read once: optimize calibrates on these batches (MemoryPlan.calibration_batches), not the file again.
        batches = load_batches(model, data[0], data[1], batch_size)
        held, working = statistics_in_segments(model, batches, wanted)
    statistics = held + working
    budget = memory.segment_budget(activations + statistics, free)
    if whole or budget is None:
        reason = f"{', '.join(whole)} run the whole model; " if whole else ""
        # In segments the least it can take is the smallest segment beside the statistics.
        memory.check("calibration" if whole else "calibration, even in segments,",
                     weights if whole else memory.MIN_SEGMENT_BYTES, activations, f"{reason}pass a smaller "
                     "--batch-size, --include fewer layers, or leave out --calibration", free,
                     statistics_bytes=statistics)
        return None, batches
    logging.getLogger("onnxlr").warning(
        "calibration: onnxruntime would need about %s for the whole model beside its statistics, %s is available "
        "(%s): collecting the statistics block by block (%s in memory), in segments of at most %s of weights",
        memory.gb(memory.session_bytes(weights, activations)), memory.gb(free.bytes), free.source,
        memory.gb(statistics), memory.gb(budget))
    return budget, batches


def statistics_in_segments(model: Any, batches: list, wanted: Any) -> tuple[int, int]:
    """statistics_bytes block by block: the vectors each activation sees, from shapes inferred at the calibration
    data's first batch and its number of batches."""
    from onnxlr.calibrate.calibration import statistics_bytes
    from onnxlr.model_io.shapes import infer_shapes

    shapes = infer_shapes(model, {name: array.shape for name, array in batches[0].items()})
    return statistics_bytes(model, shapes, wanted, batches=len(batches))
