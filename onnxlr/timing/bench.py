"""Latency of one model, or of two side by side, with onnxruntime.

Two models are timed interleaved in one process (A B, then B A, ...), so machine drift and noisy
neighbours hit both alike; the speedup is the median of the per-pair ratios, with its spread.
Both sessions use the same threads and graph optimization level, and both are warmed up first.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np

from onnxlr.verification.runtime import SYNTHESIZED_HINT, input_error, make_session


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/std/min in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "min_ms": float(ms.min()),
        "runs": int(len(ms)),
    }


def speedup(baseline: Sequence[float], candidate: Sequence[float]) -> dict[str, float]:
    """Median of pairwise ratios baseline/candidate (> 1 means the candidate is faster), with p10/p90."""
    ratios = np.asarray(baseline, dtype=np.float64) / np.asarray(candidate, dtype=np.float64)
    return {
        "median": float(np.median(ratios)),
        "p10": float(np.percentile(ratios, 10)),
        "p90": float(np.percentile(ratios, 90)),
    }


def timer(session, feeds: Mapping[str, np.ndarray]) -> Callable[[], float]:
    """A function that runs the session once on `feeds` and returns the seconds it took."""
    names = [o.name for o in session.get_outputs()]

    def run_once() -> float:
        start = time.perf_counter()
        session.run(names, dict(feeds))
        return time.perf_counter() - start

    return run_once


def benchmark(models: Sequence[Any], feeds: Mapping[str, np.ndarray], provider: str = "cpu",
              threads: int = 1, runs: int = 50, warmup: int = 5, optimization_level: str = "all",
              progress: Callable[[Sequence[Any], str], Any] | None = None, hint: str = SYNTHESIZED_HINT,
              graphs: Sequence[Any] = ()) -> dict[str, Any]:
    """Time each model `runs` times (interleaved when there are two) and summarize.

    A model onnxruntime cannot run on `feeds` is an OnnxlrError naming the input at fault (`graphs`: the
    models loaded with onnx-ir, to trace a failing node back to its inputs) and saying what to pass (`hint`)."""
    sessions = [make_session(m, provider, threads=threads, optimization_level=optimization_level) for m in models]
    timers = [timer(s, feeds) for s in sessions]
    times: list[list[float]] = [[] for _ in timers]
    current = 0
    try:
        for current in range(len(timers)):
            timers[current]()  # one untimed run first: inputs the model does not accept fail here, not mid-measurement
            for _ in range(max(warmup - 1, 0)):
                timers[current]()
        steps = range(runs)
        for step in progress(steps, "benchmark") if progress else steps:
            order = range(len(timers)) if step % 2 == 0 else reversed(range(len(timers)))
            for current in order:
                times[current].append(timers[current]())
    except MemoryError:
        raise
    except Exception as exc:  # onnxruntime's own exception types: the inputs do not fit the model
        label = "MODEL" if current == 0 else "OTHER"
        raise input_error(exc, feeds, f"onnxruntime cannot run {label} {_name(models[current])} on {provider}", hint,
                          graphs[current] if current < len(graphs) else None) from exc
    result: dict[str, Any] = {
        "provider": provider,
        "session_providers": sessions[0].get_providers(),
        "models": [{"model": _name(m), **summarize(t)}
                   for m, t in zip(models, times)],
        "context": run_context(threads, optimization_level, warmup, runs),
    }
    if len(times) == 2:
        result["speedup"] = speedup(times[0], times[1])
    return result


def _name(model: Any) -> str:
    return "<in memory>" if isinstance(model, bytes) else str(model)


def profile_layers(reference: Any, candidate: Any, feeds: Mapping[str, np.ndarray], provider: str = "cpu",
                   threads: int = 1, runs: int = 20, external_data_folder: Any = None,
                   deployed: bool = True) -> dict[str, Any]:
    """Per factorized layer: the original node's kernel time against its pair's (onnxruntime profiler), whichever
    of the two models is the rewritten one; a layer narrowed with its coupled partner (joint compression, no new
    node) is timed against itself in the original (`kind` "joint").

    Profiling runs separately from the timed runs (the profiler adds overhead) and at the "basic"
    optimization level, where onnxruntime keeps node names (the NCHWc and fusion passes of higher
    levels rename nodes, and a pair could no longer be matched to its layer).

    `deployed`: also profile both models at the "all" level users deploy with, and rank the kernels whose time grew
    the most there (`grown`), the nodes onnxlr did not touch included: a slowdown shows where it happens.
    """
    models = [reference, candidate]
    reference_times, candidate_times = _profiles(models, feeds, provider, threads, runs, external_data_folder)
    joint = joint_layers(candidate)
    if not _has_pairs(candidate_times) and not joint and (_has_pairs(reference_times) or joint_layers(reference)):
        reference_times, candidate_times = candidate_times, reference_times  # MODEL is the rewritten one
        joint = joint_layers(reference)
        models = models[::-1]
    layers: list[dict[str, Any]] = []
    for name in sorted({n[: -len("_lr1")] for n in candidate_times if n.endswith("_lr1")}):
        original = reference_times.get(name)
        pair = [candidate_times.get(f"{name}_lr1"), candidate_times.get(f"{name}_lr2")]
        pair_us = sum(cast("list[float]", pair)) if all(t is not None for t in pair) else None
        layers.append({"name": name, "kind": "pair", "original_us": original, "pair_us": pair_us,
                       "speedup": original / pair_us if original and pair_us else None})
    for name in sorted(joint):
        original, narrowed = reference_times.get(name), candidate_times.get(name)
        layers.append({"name": name, "kind": "joint", "original_us": original, "pair_us": narrowed,
                       "speedup": original / narrowed if original and narrowed else None})
    result = {"optimization_level": "basic", "runs": runs, "layers": layers,
              "total_us": {"reference": sum(reference_times.values()), "candidate": sum(candidate_times.values())}}
    if deployed:
        before, after = _profiles(models, feeds, provider, threads, runs, external_data_folder, optimization_level="all")
        result["grown"] = grown_nodes(before, after, {row["name"] for row in layers})
        result["grown_optimization_level"] = "all"
    return result


GROWN_SHOWN = 15


def grown_nodes(reference: Mapping[str, float], candidate: Mapping[str, float], rewritten: set[str],
                limit: int = GROWN_SHOWN) -> list[dict[str, Any]]:
    """The nodes whose kernel time grew the most from the original to the rewritten model, `rewritten` by onnxlr or
    not: where a slowdown happens, largest growth first. A kernel of a factor pair counts as its layer (its names
    start with the layer's and `_lr`, at every optimization level: `L_lr1`, or `L_lr_mid_nchwc` where onnxruntime
    names a converted node after its output)."""
    merged: dict[str, float] = {}
    for name, us in candidate.items():
        layer = next((layer for layer in rewritten if name.startswith(f"{layer}_lr")), name)
        merged[layer] = merged.get(layer, 0.0) + us
    rows: list[dict[str, Any]] = []
    for name in set(merged) | set(reference):
        before, after = reference.get(name), merged.get(name)
        growth = (after or 0.0) - (before or 0.0)
        rows.append({"name": name, "original_us": before, "rewritten_us": after, "growth_us": growth,
                     "touched": name in rewritten})
    rows.sort(key=lambda row: -row["growth_us"])
    return [row for row in rows if row["growth_us"] > 0][:limit]


def joint_layers(model: Any) -> list[str]:
    """The layers onnxlr narrowed jointly with a coupled partner (metadata `onnxlr.joint` of a written model)."""
    import json

    import onnx

    try:
        proto = onnx.load(model, load_external_data=False) if not isinstance(model, bytes) else onnx.load_from_string(model)
    except Exception:  # not readable as a model here: onnxruntime has read it already, so no joint layers named
        return []
    recorded = next((p.value for p in proto.metadata_props if p.key == "onnxlr.joint"), None)
    return sorted(json.loads(recorded)) if recorded else []


def _has_pairs(times: Mapping[str, float]) -> bool:
    return any(name.endswith("_lr1") for name in times)


def _profiles(models: Sequence[Any], feeds: Mapping[str, np.ndarray], provider: str, threads: int,
              runs: int, external_data_folder: Any = None, optimization_level: str = "basic"
              ) -> list[dict[str, float]]:
    """Median kernel time in microseconds per node name of each model, from onnxruntime's profiler; the models
    run interleaved (A B, B A, ...) after a warm-up, so drift and noisy neighbours hit them alike, and the median
    keeps a preempted run from moving a layer's figure."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnxlr-profile-") as folder:
        sessions = [make_session(model, provider, threads=threads, optimization_level=optimization_level,
                                 profile_prefix=os.path.join(folder, f"profile{index}"),
                                 external_data_folder=external_data_folder)
                    for index, model in enumerate(models)]
        names = [[o.name for o in session.get_outputs()] for session in sessions]
        for session, outputs in zip(sessions, names):
            session.run(outputs, dict(feeds))  # warm-up, dropped below by counting only the last `runs`
        for step in range(runs):
            order = range(len(sessions)) if step % 2 == 0 else reversed(range(len(sessions)))
            for index in order:
                sessions[index].run(names[index], dict(feeds))
        files = [session.end_profiling() for session in sessions]
        results = []
        for path in files:
            with open(path, encoding="utf-8") as stream:
                results.append(_kernel_times(json.load(stream), runs))
    return results


def _kernel_times(events: list[dict[str, Any]], runs: int) -> dict[str, float]:
    durations: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")].removeprefix("fused ")
        durations.setdefault(name, []).append(float(event["dur"]))
    return {name: float(np.median(times[-runs:])) for name, times in durations.items()}


def run_context(threads: int, optimization_level: str, warmup: int, runs: int) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    return {
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "graph_optimization_level": optimization_level,
        "warmup_runs": warmup,
        "runs": runs,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

