"""Synthesized inputs the model accepts: pick dynamic dims by running the reference on a small probe.

Dims that --shape, the declared signature or the graph fix are used as they are; the others come
from a short ladder per class of dim (onnxlr.model_io.inputs.LADDERS: spatial 32 -> 64 -> 224 -> 320 -> 640,
sequence 16 -> 128 -> 512 -> 16000, ...). Each ladder step is tried by running the reference model
(never the candidate) once on one sample on the CPU; the first step it runs gives the feeds. When
no step runs, the error names the input and says what to pass instead. A model verified in segments takes
step 0 unprobed (unprobed_feeds): its probe would be a whole pass over the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import numpy as np

from onnxlr.errors import OnnxlrError
from onnxlr.model_io.inputs import (
    LADDER_STEPS,
    MAX_SYNTHESIZED_BYTES,
    InputSpec,
    load_inputs,
    resolve_shapes,
    synthesize_inputs,
    synthesized_bytes,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Feeds:
    """The arrays to feed and whether onnxlr synthesized them (their shapes go into the reports)."""

    arrays: dict[str, np.ndarray]
    synthesized: bool


def model_feeds(reference_source: str | os.PathLike | bytes, specs: Mapping[str, InputSpec],
                inputs_path: str | os.PathLike | None, seed: int, samples: int,
                shapes: Mapping[str, tuple[int, ...]] | None, segment_budget: int | None = None) -> Feeds:
    """The feeds of verify, optimize's verification and bench: --inputs as given, else synthesized ones
    the reference accepts."""
    if inputs_path:
        return Feeds(load_inputs(inputs_path, specs), synthesized=False)
    return Feeds(feeds_the_model_accepts(reference_source, specs, seed, samples, shapes, segment_budget),
                 synthesized=True)


def feeds_the_model_accepts(reference_source: str | os.PathLike | bytes, specs: Mapping[str, InputSpec],
                            seed: int = 0, samples: int = 8,
                            shapes: Mapping[str, tuple[int, ...]] | None = None,
                            segment_budget: int | None = None) -> dict[str, np.ndarray]:
    """Synthesized feeds at the first ladder step whose one-sample probe the reference runs on the CPU
    (`segment_budget`: in segments of at most that many bytes of weights, for a model that does not fit whole)."""
    steps = _distinct_steps(specs, shapes)
    if len(steps) == 1:  # nothing onnxlr chooses: a failing reference is reported by verify itself
        return synthesize_inputs(specs, seed, samples, shapes)
    affordable = _affordable(steps, specs, samples, shapes)
    if not affordable:
        return synthesize_inputs(specs, seed, samples, shapes)  # raises: the inputs would be too large
    from onnxlr.verification.runtime import error_text

    run = _probe_runner(reference_source, segment_budget)
    error = ""
    for step in affordable:
        probe = synthesize_inputs(specs, seed, 1, shapes, step)
        try:
            run(probe)
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's own exception types: this step's shapes do not fit the model
            error = error_text(exc)
            logger.info("the reference fails on synthesized inputs %s: %s", _shapes_text(probe), error)
            continue
        return synthesize_inputs(specs, seed, samples, shapes, step)
    raise _no_shape_runs(specs, shapes, affordable, error)


def unprobed_feeds(specs: Mapping[str, InputSpec], seed: int = 0, samples: int = 8,
                   shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray] | None:
    """The feeds of the first ladder step, not probed; None when there is no step to choose.

    For a model run in segments, a probe is a whole pass over the weights: verification runs the reference on
    these first and probes (feeds_the_model_accepts) only when the reference refuses them."""
    steps = _distinct_steps(specs, shapes)
    if len(steps) == 1:
        return None
    affordable = _affordable(steps, specs, samples, shapes)
    return synthesize_inputs(specs, seed, samples, shapes, affordable[0]) if affordable else None


def _probe_runner(reference_source: str | os.PathLike | bytes, segment_budget: int | None):
    """Runs the reference once on a probe: one session, or segment by segment (onnxlr.verification.segments)."""
    if segment_budget is not None and not isinstance(reference_source, bytes):
        import onnx

        from onnxlr.verification.segments import run_in_segments

        outputs = [o.name for o in onnx.load(str(reference_source), load_external_data=False).graph.output]
        return lambda probe: run_in_segments(reference_source, [probe], outputs, segment_budget)
    from onnxlr.verification.runtime import make_session

    session = make_session(reference_source, "cpu")
    return lambda probe: session.run(None, probe)


def _affordable(steps: list[int], specs: Mapping[str, InputSpec], samples: int,
                shapes: Mapping[str, tuple[int, ...]] | None) -> list[int]:
    """The steps whose inputs stay under MAX_SYNTHESIZED_BYTES."""
    return [s for s in steps
            if synthesized_bytes(specs, resolve_shapes(specs, samples, shapes, s)) <= MAX_SYNTHESIZED_BYTES]


def _shapes_text(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, a.shape)) or 'scalar'}" for name, a in feeds.items())


def _distinct_steps(specs: Mapping[str, InputSpec], shapes: Mapping[str, tuple[int, ...]] | None) -> list[int]:
    """Ladder steps whose one-sample shapes differ (steps past every ladder's end repeat the last)."""
    seen: list[dict[str, tuple[int, ...]]] = []
    steps = []
    for step in range(LADDER_STEPS):
        resolved = resolve_shapes(specs, 1, shapes, step)
        if resolved not in seen:
            seen.append(resolved)
            steps.append(step)
    return steps


def _no_shape_runs(specs: Mapping[str, InputSpec], shapes: Mapping[str, tuple[int, ...]] | None,
                   steps: list[int], error: str) -> OnnxlrError:
    """One line: which input onnxlr could not size, what it tried, and what to pass."""
    tried = [resolve_shapes(specs, 1, shapes, step) for step in steps]
    chosen = [name for name in specs if len({t[name] for t in tried}) > 1]
    name = chosen[0]
    sizes = ", ".join("x".join(map(str, t[name])) for t in tried)
    others = f" (and {', '.join(repr(n) for n in chosen[1:])})" if len(chosen) > 1 else ""
    return OnnxlrError(f"onnxruntime cannot run the reference model on synthesized inputs: input {name!r}{others} "
                       f"tried as {sizes} ({error}); pass --shape {name}:DIMS or --inputs FILE.npz")


__all__ = ["Feeds", "feeds_the_model_accepts", "model_feeds", "unprobed_feeds"]
