"""Latency of one model, or of two side by side, with onnxruntime.

Two models are timed interleaved in one process (A B, then B A, ...), so machine drift and noisy
neighbours hit both alike; the speedup is the median of the per-pair ratios, with its spread.
Both sessions use the same threads and graph optimization level, and both are warmed up first.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxlr.verify import make_session


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


def _timer(session, feeds: Mapping[str, np.ndarray]) -> Callable[[], float]:
    names = [o.name for o in session.get_outputs()]

    def run_once() -> float:
        start = time.perf_counter()
        session.run(names, dict(feeds))
        return time.perf_counter() - start

    return run_once


def benchmark(models: Sequence[Any], feeds: Mapping[str, np.ndarray], provider: str = "cpu",
              threads: int = 1, runs: int = 50, warmup: int = 5, optimization_level: str = "all",
              progress: Callable[[Sequence[Any], str], Any] | None = None) -> dict[str, Any]:
    """Time each model `runs` times (interleaved when there are two) and summarize."""
    sessions = [make_session(m, provider, threads=threads, optimization_level=optimization_level) for m in models]
    timers = [_timer(s, feeds) for s in sessions]
    for timer in timers:
        for _ in range(warmup):
            timer()
    times: list[list[float]] = [[] for _ in timers]
    steps = range(runs)
    for step in progress(steps, "benchmark") if progress else steps:
        order = range(len(timers)) if step % 2 == 0 else reversed(range(len(timers)))
        for index in order:
            times[index].append(timers[index]())
    result: dict[str, Any] = {
        "provider": provider,
        "session_providers": sessions[0].get_providers(),
        "models": [{"model": str(m) if not isinstance(m, bytes) else "<in memory>", **summarize(t)}
                   for m, t in zip(models, times)],
        "context": run_context(threads, optimization_level, warmup, runs),
    }
    if len(times) == 2:
        result["speedup"] = speedup(times[0], times[1])
    return result


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

