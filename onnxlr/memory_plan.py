"""Memory planning before verification and calibration (what `optimize` and `verify` check first).

Verification runs the models whole when they fit and are small, else in segments (onnxlr.segments); calibration
runs the original whole when it fits beside its Gram matrices, else block by block, where few samples of a wide
activation stay on disk (onnxlr.calibration.SampleAccumulator). What cannot fit stops with one line and exit 2.
"""

from __future__ import annotations

import logging
from typing import Any


def check_memory(loaded: Any, input_shapes: dict, verify_options: dict, verifying: bool,
                  calibration: tuple | None = None, config: Any = None) -> None:
    """Before hours are spent: the original's onnxruntime session (verification runs one model at a time, and the
    rewritten one is never larger) must fit the memory available, at the batch the runs use."""
    calibrating = calibration is not None
    if not (verifying or calibrating):
        return
    from onnxlr import cost, memory
    from onnxlr.shapes import infer_shapes

    batch = verify_options["batch_size"] if verify_options["inputs_path"] or calibrating else min(
        verify_options["samples"], verify_options["batch_size"])
    shapes = infer_shapes(loaded.model, {name: (min(dims[0], batch), *dims[1:]) if dims else dims
                                         for name, dims in input_shapes.items()})
    weights = cost.model_totals(loaded.model)["bytes"]
    scale = batch if not input_shapes else 1
    activations = memory.peak_activation_bytes(loaded.model, shapes) * scale
    free = memory.available()
    if free is not None and memory.input_bytes(loaded.model, shapes) * scale > free.bytes:
        return  # the inputs alone cannot exist: the input stage names the one at fault, more precisely than this
    if verifying:
        plan_verification(weights, activations, free, verify_options)
    if calibrating:
        plan_calibration(loaded.model, shapes, weights, activations, free, config, verify_options, calibration)


def plan_verification(weights: int, activations: int, free: Any, verify_options: dict) -> None:
    """Whole models when they fit and are small; else in segments of consecutive nodes (onnxlr.segments), one at a
    time: peak memory follows one segment, and the comparison is still of the models' outputs."""
    from onnxlr import memory

    fits = memory.fits(weights, activations, free)
    if fits and weights <= memory.SEGMENTED_ABOVE_BYTES:
        return
    budget = memory.segment_budget(activations, free)
    memory.check("verification", weights if budget is None else 0, activations, "pass --no-verify, or a smaller "
                 "--batch-size / --samples", free)
    verify_options["segment_budget"] = budget
    log = logging.getLogger("onnxlr")
    if not fits:
        log.warning("verification: onnxruntime would need about %s for the whole model, %s is available (%s): "
                    "verifying in segments of at most %s of weights, one at a time",
                    memory.gb(memory.session_bytes(weights, activations)), memory.gb(free.bytes), free.source,
                    memory.gb(budget))
    else:
        log.info("verification: %s of weights (over %s): verifying in segments of at most %s of weights, one at a "
                 "time", memory.gb(weights), memory.gb(memory.SEGMENTED_ABOVE_BYTES), memory.gb(budget))


def plan_calibration(model: Any, shapes: dict, weights: int, activations: int, free: Any, config: Any,
                      verify_options: dict, data: tuple) -> None:
    """The whole original in one session when it fits beside its Gram matrices (K x K float64 per activation);
    else its statistics block by block (segments), where an activation seen by fewer vectors than half its width
    keeps them on disk instead of a Gram, and the steps that run the whole model (sensitivity, target search,
    compensation, static quantization) are refused. `data`: (calibration path, --calibration-samples)."""
    from onnxlr import memory
    from onnxlr.calibration import statistics_bytes
    from onnxlr.targets import selected

    def wanted(probe: Any) -> bool:
        return probe.op in config.ops and selected(probe.node, config)

    held, working = statistics_bytes(model, shapes, wanted)
    if free is None or memory.session_bytes(weights, activations) + held + working <= free.bytes:
        return
    whole = [flag for flag, asked in (("--param-budget/--mac-budget", config.budget is not None),
                                      ("--target-cosine/--target-error", config.target_cosine is not None
                                       or config.target_error is not None),
                                      ("--compensate", config.compensate),
                                      ("--quantize int8-static", config.quantize == "int8-static")) if asked]
    if not whole:
        from onnxlr.inputs import load_batches

        # Read once: optimize calibrates on these batches (verify_options["calibration_batches"]), not the file again.
        batches = load_batches(model, data[0], data[1], verify_options["batch_size"])
        verify_options["calibration_batches"] = batches
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
        return
    verify_options["calibration_segment_budget"] = budget
    logging.getLogger("onnxlr").warning(
        "calibration: onnxruntime would need about %s for the whole model beside its statistics, %s is available "
        "(%s): collecting the statistics block by block (%s in memory), in segments of at most %s of weights",
        memory.gb(memory.session_bytes(weights, activations)), memory.gb(free.bytes), free.source,
        memory.gb(statistics), memory.gb(budget))


def statistics_in_segments(model: Any, batches: list, wanted: Any) -> tuple[int, int]:
    """statistics_bytes block by block: the vectors each activation sees, from shapes inferred at the calibration
    data's first batch and its number of batches."""
    from onnxlr.calibration import statistics_bytes
    from onnxlr.shapes import infer_shapes

    shapes = infer_shapes(model, {name: array.shape for name, array in batches[0].items()})
    return statistics_bytes(model, shapes, wanted, batches=len(batches))
