"""Compare a candidate model with its reference on onnxruntime, per output and execution provider.

Metrics per output (all computed in float64 over every sample):
  max_abs / mean_abs   |candidate - reference|
  max_rel              max |candidate - reference| / |reference| over elements where reference != 0
  cosine               cosine similarity of the flattened outputs
  mean_sample_cosine   mean over samples (first axis) of each sample's cosine similarity
  snr_db               10 log10(sum reference^2 / sum (candidate - reference)^2)
  top1_agreement       share of rows whose argmax over the last axis agrees (outputs that look like scores)
  nan / inf            counts in the candidate (and in the reference)

Gates (Polygraphy-style, elementwise like numpy.isclose): an output passes `--atol/--rtol` when
every element has |candidate - reference| <= atol + rtol * |reference|; `--min-cosine` bounds the
cosine. A candidate output with NaN/Inf where the reference has none always fails.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError
from onnxlr.runtime import make_session, run_all

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Gates:
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None


@dataclasses.dataclass
class VerificationResult:
    """Per provider, the metrics of every output (and compared layer); passed when every gate holds."""

    passed: bool
    providers: dict[str, Any]  # provider -> {"session_providers", "outputs", "layers"[, "reference_vs_cpu"]}
    gates: dict[str, Any]
    samples: int
    failures: list[str]  # one sentence per failed output and provider

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare_arrays(reference: np.ndarray, candidate: np.ndarray, gates: Gates) -> dict[str, Any]:
    if reference.shape != candidate.shape:
        return {"passed": False, "failure": f"shape {candidate.shape} != reference {reference.shape}"}
    if reference.dtype.kind not in "biufc" or candidate.dtype.kind not in "biufc":
        return _compare_exact(reference, candidate)
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf where both have it: counted, not warned about
        return _compare(reference, candidate, gates)


def _compare_exact(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Outputs without a numeric distance (strings): equal element by element, or failed."""
    differ = int(np.count_nonzero(reference != candidate))
    failure = f"{differ} of {reference.size} elements differ" if differ else None
    return {"shape": list(reference.shape), "max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0,
            "cosine": 0.0 if differ else 1.0, "snr_db": None, "nan": 0, "inf": 0, "reference_nan": 0,
            "reference_inf": 0, "mismatched": differ, "failure": failure, "passed": failure is None}


def _compare(reference: np.ndarray, candidate: np.ndarray, gates: Gates) -> dict[str, Any]:
    ref = reference.astype(np.float64).reshape(-1)
    out = candidate.astype(np.float64).reshape(-1)
    finite = np.isfinite(ref) & np.isfinite(out)
    diff = np.abs(out - ref)
    diff_finite = diff[finite]
    nonzero = finite & (ref != 0)
    error_energy = float(np.sum(diff_finite**2))
    signal = float(np.sum(ref[finite] ** 2))
    metrics: dict[str, Any] = {
        "shape": list(reference.shape),
        "max_abs": float(diff_finite.max()) if diff_finite.size else 0.0,
        "mean_abs": float(diff_finite.mean()) if diff_finite.size else 0.0,
        "max_rel": float(np.max(diff[nonzero] / np.abs(ref[nonzero]))) if nonzero.any() else 0.0,
        "cosine": _cosine(ref[finite], out[finite]),
        "snr_db": (math.inf if error_energy == 0 else 10 * math.log10(signal / error_energy)) if signal else None,
        "nan": int(np.isnan(out).sum()), "inf": int(np.isinf(out).sum()),
        "reference_nan": int(np.isnan(ref).sum()), "reference_inf": int(np.isinf(ref).sum()),
    }
    if reference.ndim >= 2 and len(reference) > 1:
        # Mean over samples of each sample's cosine: what matters for embeddings and per-image outputs.
        rows_ref = reference.reshape(len(reference), -1).astype(np.float64)
        rows_out = candidate.reshape(len(candidate), -1).astype(np.float64)
        metrics["mean_sample_cosine"] = float(np.mean([_cosine(a, b) for a, b in zip(rows_ref, rows_out)]))
    if _looks_like_scores(reference) and reference.size:
        metrics["top1_agreement"] = float(np.mean(np.argmax(reference, -1) == np.argmax(candidate, -1)))
    metrics["failure"] = _gate_failure(ref, out, diff, metrics, gates)
    metrics["passed"] = metrics["failure"] is None
    return metrics


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norm)


def _looks_like_scores(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and array.ndim == 2 and 2 <= array.shape[-1] <= 1_000_000


def _gate_failure(ref, out, diff, metrics, gates: Gates) -> str | None:
    new_nonfinite = (metrics["nan"] + metrics["inf"]) - (metrics["reference_nan"] + metrics["reference_inf"])
    if new_nonfinite > 0:
        return f"{new_nonfinite} NaN/Inf values that the reference does not have"
    if gates.atol is not None or gates.rtol is not None:
        atol, rtol = gates.atol or 0.0, gates.rtol or 0.0
        finite = np.isfinite(ref) & np.isfinite(out)
        bad = diff[finite] > atol + rtol * np.abs(ref[finite])
        if bad.any():
            return (f"{int(bad.sum())} of {bad.size} elements exceed atol {atol:g} + rtol {rtol:g} x |reference| "
                    f"(max abs {metrics['max_abs']:.3g}, max rel {metrics['max_rel']:.3g})")
    if gates.min_cosine is not None and metrics["cosine"] < gates.min_cosine:
        return f"cosine {metrics['cosine']:.6f} < --min-cosine {gates.min_cosine}"
    return None


def verify(reference: str | os.PathLike | bytes, candidate: str | os.PathLike | bytes,
           feeds: Mapping[str, np.ndarray], providers: Sequence[str], gates: Gates,
           batch_size: int = 16, per_layer: Sequence[str] = (), threads: int = 0) -> VerificationResult:
    """Run both models on each provider and compare (metrics: see the module doc).

    `per_layer` names intermediate tensors present in both models (the outputs of factorized
    nodes); they are exposed as extra outputs and compared too.
    """
    reference_bytes = _with_outputs(reference, per_layer) if per_layer else reference
    candidate_bytes = _with_outputs(candidate, per_layer) if per_layer else candidate
    result = VerificationResult(passed=True, providers={}, gates=dataclasses.asdict(gates),
                                samples=_sample_count(feeds), failures=[])
    cpu_reference: dict[str, np.ndarray] | None = None
    for provider in providers:
        ref_session = make_session(reference_bytes, provider, threads)
        cand_session = make_session(candidate_bytes, provider, threads)
        names = [o.name for o in ref_session.get_outputs()]
        cand_names = {o.name for o in cand_session.get_outputs()}
        if not set(names) <= cand_names:
            raise OnnxlrError(f"the candidate lacks output(s) {', '.join(sorted(set(names) - cand_names))}")
        try:
            ref_out = run_all(ref_session, feeds, batch_size, names)
        except MemoryError:
            raise
        except Exception as exc:  # the input model itself fails (bad attributes, shapes): bad input, not a bug
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
            raise OnnxlrError(f"onnxruntime cannot run the reference model on {provider}: {reason}") from exc
        cand_out = run_all(cand_session, feeds, batch_size, names)
        model_outputs = [n for n in names if n not in per_layer]
        entry: dict[str, Any] = {"session_providers": cand_session.get_providers(), "outputs": {}, "layers": {}}
        for name in names:
            metrics = compare_arrays(ref_out[name], cand_out[name], gates if name in model_outputs else Gates())
            (entry["outputs"] if name in model_outputs else entry["layers"])[name] = metrics
            if name in model_outputs and not metrics["passed"]:
                result.passed = False
                result.failures.append(f"output {name!r} on {provider}: {metrics['failure']}")
        if provider == "cpu":
            cpu_reference = ref_out
        elif cpu_reference is not None:
            # Provider noise, separate from factorization error: this provider's reference vs the CPU's.
            entry["reference_vs_cpu"] = {n: _noise(cpu_reference[n], ref_out[n]) for n in model_outputs}
        result.providers[provider] = entry
    return result


def _noise(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    metrics = compare_arrays(a, b, Gates())
    return {k: metrics[k] for k in ("max_abs", "mean_abs", "cosine") if k in metrics}


def _sample_count(feeds: Mapping[str, np.ndarray]) -> int:
    counts = [len(a) for a in feeds.values() if a.ndim]
    return min(counts) if counts else 1


def _with_outputs(model: str | os.PathLike | bytes, names: Sequence[str]) -> bytes | str:
    """The model with extra graph outputs for `names` (weights stay external: onnxruntime needs the path)."""
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
        base = None
    else:
        proto = onnx.load(str(model), load_external_data=False)
        base = Path(model).resolve().parent
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    if base is not None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        # onnxruntime resolves external data next to the model file: write the variant beside it.
        raise OnnxlrError("--per-layer is not supported yet for models with external data")
    return proto.SerializeToString()


def factorized_outputs(candidate: str | os.PathLike | onnx.ModelProto) -> list[str]:
    """Main-graph tensors that end a factorized pair (same name as the replaced node's output)."""
    if isinstance(candidate, onnx.ModelProto):
        proto = candidate
    else:
        proto = onnx.load(str(candidate), load_external_data=False)
    names = []
    for node in proto.graph.node:
        if any(p.key == "onnxlr.pair" and p.value == "2" for p in node.metadata_props):
            names.append(node.output[0])
    return names
