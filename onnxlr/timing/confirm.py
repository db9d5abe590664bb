"""A latency plan confirmed end to end: the rewritten model is timed against its input, whole, before it is written.

Candidates are ranked by micro-models timed in isolation (onnxlr.timing.latency), but a layer's time in the whole model
also depends on its neighbours, the layouts and fusions onnxruntime picks at the deployed optimization level and the
values it computes on (a real OCR model's factor conv ran 16x slower in the model than in isolation). So under
`--objective latency`, after the rewrite:

1. each rewritten layer's kernels are profiled in the whole model against the original layer's (onnxruntime's
   profiler, at the level where it keeps node names); a unit (a layer, or a joint pair's layers together) whose
   kernels take more than MARGIN longer there is reverted;
2. the whole rewritten model is timed against the original, interleaved in one process (A B, B A, ...), at the
   deployed optimization level, on the provider and threads the plan was made for;
3. while it is not faster end to end, the half of the remaining layers that gained least in context is reverted
   and the model timed again; if none is left, the original's plan of zero layers is what is written.

Reverting puts the original node (and its weights) back in place of its factor pair, or a jointly narrowed pair's
original weights back (onnxlr.factorize.revert), so no layer is factorized again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxlr.factorize import revert
from onnxlr.timing import bench
from onnxlr.verification.runtime import make_session

logger = logging.getLogger(__name__)

SECONDS = 2.0  # timing budget of one end-to-end comparison (runs are clamped below)
MIN_RUNS, MAX_RUNS, WARMUP = 10, 400, 3
PROFILE_RUNS = 10
REQUIRED_SPEEDUP = 1.0  # the median of the per-run ratios must exceed it: never a slower model
MARGIN = 0.05  # a unit is put back from the profile alone when its kernels take 5% longer than the original's


@dataclasses.dataclass(frozen=True)
class Speed:
    """The written model against its input, end to end: the median of the per-run ratios and its spread."""

    speedup: float  # original time / rewritten time; > 1 is faster
    p10: float
    p90: float
    original_ms: float
    rewritten_ms: float
    runs: int
    provider: str
    threads: int
    optimization_level: str = "all"

    @property
    def faster(self) -> bool:
        return self.speedup > REQUIRED_SPEEDUP

    def to_json(self) -> dict[str, Any]:
        return {key: round(value, 4) if isinstance(value, float) else value
                for key, value in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """What the end-to-end confirmation did: the speed of what is written, and the layers it reverted (by source
    node name, with why)."""

    speed: Speed
    first_speed: Speed | None  # the plan as rewritten, before any revert (None when the profile reverted nothing)
    reverted: dict[str, str]  # layer -> reason
    in_context: list[dict[str, Any]]  # each rewritten layer's profile in the whole model (bench.profile_layers)

    def to_json(self) -> dict[str, Any]:
        return {"speed": self.speed.to_json(), "before_reverts": self.first_speed.to_json() if self.first_speed else None,
                "reverted": dict(self.reverted), "in_context": self.in_context}


def session_source(model: ir.Model) -> bytes:
    """The model as onnxruntime reads it from memory (its external tensors stay references to their files)."""
    return ir.to_proto(model).SerializeToString()


def time_whole(reference: Any, candidate: Any, feeds: Mapping[str, np.ndarray], provider: str = "cpu",
               threads: int = 1, seconds: float = SECONDS, external_data_folder: str | os.PathLike | None = None
               ) -> Speed:
    """Both models end to end on `feeds`, interleaved after warm-up, at the deployed optimization level ("all")."""
    sessions = [make_session(model, provider, threads=threads, external_data_folder=external_data_folder)
                for model in (reference, candidate)]
    timers = [bench.timer(session, feeds) for session in sessions]
    for run in timers:
        for _ in range(WARMUP):
            run()
    estimate = sum(run() for run in timers)
    runs = int(min(MAX_RUNS, max(MIN_RUNS, seconds / max(estimate, 1e-9))))
    times: list[list[float]] = [[], []]
    for step in range(runs):
        for index in ((0, 1) if step % 2 == 0 else (1, 0)):
            times[index].append(timers[index]())
    ratio = bench.speedup(times[0], times[1])
    return Speed(speedup=ratio["median"], p10=ratio["p10"], p90=ratio["p90"],
                 original_ms=float(np.median(times[0])) * 1e3, rewritten_ms=float(np.median(times[1])) * 1e3,
                 runs=runs, provider=provider, threads=threads)


def confirm_latency(original: ir.Model, reference: Any, model: ir.Model, feeds: Mapping[str, np.ndarray],
                    provider: str = "cpu", threads: int = 1, seconds: float = SECONDS,
                    external_data_folder: str | os.PathLike | None = None) -> Confirmation:
    """Revert, in `model` (rewritten in place), the layers that do not pay in the whole model, until it is faster
    than `reference` (the original's bytes or path; `original`: the same model in onnx-ir form) or none is left."""
    folder = external_data_folder
    profile = bench.profile_layers(reference, session_source(model), feeds, provider, threads=threads,
                                   runs=PROFILE_RUNS, external_data_folder=folder, deployed=False)
    in_context = profile["layers"]
    reverted: dict[str, str] = {}
    gains = unit_gains(revert.units(model), in_context)
    slower = {}
    for unit, (original_us, rewritten_us) in gains.items():
        if original_us is not None and rewritten_us > original_us * (1 + MARGIN):
            slower[unit] = (f"slower in the whole model: {rewritten_us:.0f} us against the original's "
                            f"{original_us:.0f} us (onnxruntime's profile)")
    _revert(model, original, slower, reverted)
    speed = time_whole(reference, session_source(model), feeds, provider, threads, seconds, folder)
    first = None
    # Back off: the units that gained least in context (unmatched ones first) go first, half at a time.
    ranked = sorted(gains, key=lambda unit: _gain(gains[unit]))
    while not speed.faster:
        left = set(revert.units(model).values())
        remaining = [unit for unit in ranked if unit in left] + sorted(left - set(ranked))
        if not remaining:
            break
        first = first or speed
        why = (f"backed off: the whole model measured {speed.speedup:.2f}x ({speed.rewritten_ms:.2f} ms against "
               f"{speed.original_ms:.2f} ms) with it")
        _revert(model, original, dict.fromkeys(remaining[: max(1, len(remaining) // 2)], why), reverted)
        logger.info("the rewritten model measured %.3fx end to end: reverting layers", speed.speedup)
        speed = time_whole(reference, session_source(model), feeds, provider, threads, seconds, folder)
    return Confirmation(speed=speed, first_speed=first, reverted=reverted, in_context=in_context)


def unit_gains(units: Mapping[str, str], in_context: Sequence[Mapping[str, Any]]
               ) -> dict[str, tuple[float | None, float]]:
    """Each unit's kernel time in the whole model, original and rewritten (us), summed over its layers (a joint
    pair is judged as a whole: one of its layers may slow down while the pair gains); None: not all matched."""
    totals: dict[str, tuple[float | None, float]] = {}
    for layer in in_context:
        unit = units.get(layer["name"])
        if unit is None:
            continue
        original_us, rewritten_us = totals.get(unit, (0.0, 0.0))
        if original_us is None or layer.get("original_us") is None or layer.get("pair_us") is None:
            totals[unit] = (None, 0.0)
        else:
            totals[unit] = (original_us + layer["original_us"], rewritten_us + layer["pair_us"])
    return totals


def _revert(model: ir.Model, original: ir.Model, units: Mapping[str, str], reverted: dict[str, str]) -> None:
    """Put back every layer of `units` (unit -> why), recording why for each layer."""
    members = revert.units(model)
    layers = {name: units[unit] for name, unit in members.items() if unit in units}
    for name in revert.revert_layers(model, original, list(layers)):
        reverted[name] = layers.get(name, "reverted with its coupled partner")


def _gain(times: tuple[float | None, float]) -> float:
    """Microseconds a unit's rewrite saved in the whole model (unmatched: none known, -inf)."""
    return -np.inf if times[0] is None else float(times[0] - times[1])


def feeds_for(model: ir.Model, reference: Any, batches: Sequence[Mapping[str, np.ndarray]] | None,
              input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, np.ndarray]:
    """What the confirmation times on, at the shapes the plan timed its candidates at: the first calibration batch
    (unless `input_shapes` asks for other shapes), else inputs synthesized at `input_shapes` that the reference
    accepts."""
    if batches:
        names = {value.name for value in model.graph.inputs}
        batch = {name: array for name, array in batches[0].items() if name in names}
        if not input_shapes or all(tuple(batch[name].shape) == tuple(dims)
                                   for name, dims in input_shapes.items() if name in batch):
            return batch
    from onnxlr.model_io.inputs import input_specs
    from onnxlr.model_io.synthesis import feeds_the_model_accepts

    shapes = {name: tuple(dims) for name, dims in (input_shapes or {}).items()}
    return feeds_the_model_accepts(reference, input_specs(model), seed=0, samples=1, shapes=shapes or None)


def written_speed(reference_path: str | os.PathLike, candidate_path: str | os.PathLike, model: ir.Model,
                  inputs_path: str | os.PathLike | None, shapes: Mapping[str, Sequence[int]] | None, samples: int,
                  provider: str = "cpu", threads: int = 1, seconds: float = SECONDS) -> Speed:
    """The size objective's speed check: the written file against its input, end to end, on the first `samples`
    samples of `inputs_path` (else inputs synthesized at `shapes` that the reference accepts)."""
    from onnxlr.model_io.inputs import input_specs, load_inputs

    if inputs_path:
        feeds = {name: array[:samples] if array.ndim else array
                 for name, array in load_inputs(inputs_path, input_specs(model)).items()}
    else:
        feeds = feeds_for(model, reference_path, None, shapes)
    return time_whole(reference_path, candidate_path, feeds, provider, threads, seconds)
