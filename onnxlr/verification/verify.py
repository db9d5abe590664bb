"""Compare a candidate model with its reference on onnxruntime, per output and execution provider.

Metrics per output (all computed in float64 over every sample; the task metrics are in
onnxlr.verification.task_metrics):
  max_abs / mean_abs   |candidate - reference|
  max_rel              max |candidate - reference| / |reference| over elements where reference != 0
  cosine               cosine similarity of the flattened outputs
  mean_sample_cosine   mean over samples (first axis) of each sample's cosine similarity
  snr_db               10 log10(sum reference^2 / sum (candidate - reference)^2)
  top1_agreement       share of rows whose argmax over the last axis agrees, for outputs that look like
                       scores (`looks_like_scores`: 2-D float, not an embedding by name or by unit-norm rows)
  accuracy             with labels (one class a sample, `--labels`): the candidate's argmax accuracy on them, and
                       the reference's as reference_accuracy
  neighbour_agreement  2-D float outputs that are not scores (embeddings), over at least NEIGHBOURS + 1 samples:
                       mean share of each sample's NEIGHBOURS nearest samples (by cosine) that stay its nearest
                       (among the first NEIGHBOUR_SAMPLES); 3-D token outputs (samples x tokens x features, a
                       transformer's last_hidden_state) are mean-pooled over the attention mask first, as
                       sentence-transformers pools them
  perplexity           language-model logits (an output named like logits or scores, samples x tokens x vocabulary,
                       beside an input_ids input whose ids the vocabulary covers): exp of the mean next-token
                       cross-entropy on the inputs' own text (attended positions), for the candidate, and the
                       reference's as reference_perplexity;
                       perplexity_kept = reference / candidate perplexity (1: unchanged); top1_agreement there is
                       the share of attended positions whose next-token argmax is unchanged
  spearman             with scored sentence pairs (`--pairs`, run beside the inputs): for embedding outputs, the
                       Spearman rank correlation of the candidate's cosine similarity of each pair with the pairs'
                       scores, the reference's as reference_spearman, and similarity_spearman between the two
                       models' similarities
  agreement            integer and boolean outputs (ids, classes, masks): share of elements exactly equal
  nan / inf            counts in the candidate (and in the reference)

Padding: when the inputs have an attention mask (samples x tokens), float outputs whose first two axes are those
(a transformer's last_hidden_state, token logits) are compared on the attended positions only: padded positions
are zeroed in both models (task_metrics.without_padding), as calibration leaves them out and every consumer ignores them. The
search of --target-* measures the same way (onnxlr.calibrate.calibration.model_outputs).

Gates (Polygraphy-style, elementwise like numpy.isclose): an output passes `--atol/--rtol` when
every element has |candidate - reference| <= atol + rtol * |reference|; `--min-cosine C` bounds the
cosine of float outputs, and the agreement of integer and boolean outputs (>= C of their elements
exactly equal). A candidate output with NaN/Inf where the reference has none always fails.
Without any gate, the default gate applies (`DEFAULT_MIN_COSINE`), unless it is turned off; each
output's `gated` lists the gates that checked it, and an output no gate checked never "passes".
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
from onnxlr.verification.layer_check import LayerCheck, summary_failures
from onnxlr.verification.runtime import (
    GIVEN_HINT,
    PROVIDERS,
    SYNTHESIZED_HINT,
    batches,
    error_text,
    input_error,
    make_session,
    run_all,
)
from onnxlr.verification.task_metrics import (
    NEIGHBOURS,
    attention_mask,
    is_language_model_logits,
    language_model_metrics,
    looks_like_scores,
    mean_pooled,
    neighbour_agreement,
    pair_metrics,
    token_ids,
    without_padding,
)

logger = logging.getLogger(__name__)

# The default quality gate: each float output keeps cosine >= 0.99 to the original (integer and
# boolean outputs: >= 99% of elements equal). On the MiniLM reference, onnxruntime's dynamic INT8
# quantization keeps 0.993 and a usable factorization 0.95-0.99+, while a destroyed one (MiniLM at
# --rank-ratio 0.25) falls to 0.35: 0.99 passes what a user would deploy instead of INT8 and stops
# what they never should. A stricter or looser figure is one flag away (--min-cosine).
DEFAULT_MIN_COSINE = 0.99
GOAL_SLACK = 1e-6  # a --target-* goal's default gate sits this far below the goal


@dataclasses.dataclass(frozen=True)
class Gates:
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    default: bool = False  # True: no gate was asked for, so the default gate applies
    min_metrics: tuple[tuple[str, float], ...] = ()  # --min-metric NAME=VALUE: (name, least value), TASK_METRICS
    source: str = ""  # where a default gate comes from, when not DEFAULT_MIN_COSINE: the run's --target-* goal

    @classmethod
    def chosen(cls, atol: float | None = None, rtol: float | None = None, min_cosine: float | None = None,
               default_gate: bool = True, min_metrics: Sequence[tuple[str, float]] = (),
               goal: tuple[str, float] | None = None) -> Gates:
        """The gates a user asked for; when none, the default gate (unless `default_gate` is off): the run's
        `goal` (metric, value) when it has one, else cosine >= DEFAULT_MIN_COSINE."""
        if atol is None and rtol is None and min_cosine is None and not min_metrics and default_gate:
            return cls.of_goal(*goal) if goal is not None else cls(min_cosine=DEFAULT_MIN_COSINE, default=True)
        return cls(atol=atol, rtol=rtol, min_cosine=min_cosine, min_metrics=tuple(min_metrics))

    @classmethod
    def of_goal(cls, metric: str, value: float) -> Gates:
        """The default gate of a run searched for a --target-* goal: what the goal promised, on the verified samples
        (GOAL_SLACK below it: the search measured the same model, to float rounding). A relative error <= E bounds
        the cosine from below by sqrt(1 - E^2)."""
        source = f"--target-{metric} {value:g} goal"
        if metric == "cosine":
            return cls(min_cosine=value - GOAL_SLACK, default=True, source=source)
        if metric == "error":
            cosine = math.sqrt(1 - value**2) - GOAL_SLACK if value < 1 else None
            return cls(min_cosine=cosine, default=True, source=source)
        return cls(min_metrics=((metric, value - GOAL_SLACK),), default=True, source=source)

    def names(self, integer: bool = False, metrics: Mapping[str, Any] | None = None) -> list[str]:
        """The gates that check an output (float, or integer/boolean; a task metric's gate where `metrics` has it)."""
        names = ["atol/rtol"] if self.atol is not None or self.rtol is not None else []
        if self.min_cosine is not None:
            names.append("min_agreement" if integer else "min_cosine")
        names += [f"min_{name}" for name, _ in self.min_metrics if TASK_METRICS[name] in (metrics or {})]
        return names


# --min-metric NAME=VALUE: the gate's name -> the metric it bounds from below
TASK_METRICS = {"top1": "top1_agreement", "neighbours": "neighbour_agreement", "sample_cosine": "mean_sample_cosine",
                "accuracy": "accuracy", "perplexity_kept": "perplexity_kept", "spearman": "spearman"}


def parse_min_metrics(items: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """--min-metric NAME=VALUE items as (name, value) pairs; a bad one is an error naming the flag."""
    parsed = []
    for item in items:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if name not in TASK_METRICS or not math.isfinite(number):
            raise OnnxlrError(f"{{0}} takes NAME=VALUE with NAME one of {', '.join(TASK_METRICS)} and a number, got "
                              f"{item!r}", "min_metric")
        parsed.append((name, number))
    return tuple(parsed)


@dataclasses.dataclass
class VerificationResult:
    """Per provider, the metrics of every output (and compared layer); passed when every gate holds."""

    passed: bool
    gated: bool  # some gate checked the model's outputs: "passed" means something only then
    providers: dict[str, Any]  # provider -> {"session_providers", "outputs", "layers"[, "reference_vs_cpu"]}
    gates: dict[str, Any]
    samples: int
    failures: list[str]  # one sentence per failed output and provider
    inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # input name -> the shape fed
    synthesized: bool = False  # whether onnxlr synthesized the inputs (else the caller gave them)
    generation: dict[str, Any] | None = None  # a KV-cache decoder: cached vs uncached greedy tokens (generation.py)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare_arrays(reference: np.ndarray, candidate: np.ndarray, gates: Gates, name: str = "",
                   labels: np.ndarray | None = None, mask: np.ndarray | None = None,
                   token_ids: np.ndarray | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics of one output (`name`: the output's name, which decides whether top-1 is meaningful; `labels`:
    the class of each sample, for the accuracy of score outputs; `mask`: the attention mask fed, samples x tokens,
    which pools token outputs for their neighbour agreement; `token_ids`: the input_ids fed, for a language
    model's perplexity; `extra`: metrics measured elsewhere, gated with these, as the scored pairs')."""
    if reference.shape != candidate.shape:
        return {"passed": False, "failure": f"shape {candidate.shape} != reference {reference.shape}"}
    if reference.dtype.kind not in "biufc" or candidate.dtype.kind not in "biufc":
        return _compare_exact(reference, candidate)
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf where both have it: counted, not warned about
        return _compare(reference, candidate, gates, name, labels, mask, token_ids, extra)


def _compare_exact(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Outputs without a numeric distance (strings): equal element by element, or failed."""
    differ = int(np.count_nonzero(reference != candidate))
    failure = f"{differ} of {reference.size} elements differ" if differ else None
    return {"shape": list(reference.shape), "max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0,
            "cosine": 0.0 if differ else 1.0, "snr_db": None, "nan": 0, "inf": 0, "reference_nan": 0,
            "reference_inf": 0, "mismatched": differ, "gated": ["exact"], "failure": failure,
            "passed": failure is None}


def _compare(reference: np.ndarray, candidate: np.ndarray, gates: Gates, name: str = "",
             labels: np.ndarray | None = None, mask: np.ndarray | None = None,
             token_ids: np.ndarray | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
    if looks_like_scores(reference, name) and reference.size:
        metrics["top1_agreement"] = float(np.mean(np.argmax(reference, -1) == np.argmax(candidate, -1)))
        if labels is not None and len(labels) == len(reference):
            metrics["reference_accuracy"] = float(np.mean(np.argmax(reference, -1) == labels))
            metrics["accuracy"] = float(np.mean(np.argmax(candidate, -1) == labels))
    elif reference.dtype.kind == "f" and reference.ndim == 2 and len(reference) > NEIGHBOURS and finite.all():
        metrics["neighbour_agreement"] = neighbour_agreement(reference, candidate)
    elif finite.all() and is_language_model_logits(reference, token_ids, name):
        assert token_ids is not None  # is_language_model_logits checked it
        metrics.update(language_model_metrics(reference, candidate, token_ids, mask))
    elif (reference.dtype.kind == "f" and reference.ndim == 3 and mask is not None and finite.all()
          and reference.shape[:2] == mask.shape and len(reference) > NEIGHBOURS):
        metrics["neighbour_agreement"] = neighbour_agreement(mean_pooled(reference, mask), mean_pooled(candidate, mask))
    metrics.update(extra or {})
    integer = _is_integer(reference)
    if integer:  # ids, classes, masks: a cosine says little, exact agreement says it all
        metrics["agreement"] = float(np.mean(reference == candidate)) if reference.size else 1.0
    metrics["gated"] = gates.names(integer, metrics)
    metrics["failure"] = _gate_failure(ref, out, diff, metrics, gates, integer)
    metrics["passed"] = metrics["failure"] is None
    return metrics


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norm)


def _is_integer(array: np.ndarray) -> bool:
    return array.dtype.kind in "biu"


OTHER_GATES = ": --min-cosine C sets another, --no-gate turns it off"


def _gate_failure(ref, out, diff, metrics, gates: Gates, integer: bool = False) -> str | None:
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
    for name, least in gates.min_metrics:
        measured = metrics.get(TASK_METRICS[name])
        if measured is not None and measured < least:
            if gates.source:
                return f"{TASK_METRICS[name]} {measured:.4f} < {least:.6g} (the {gates.source}'s gate{OTHER_GATES})"
            return f"{TASK_METRICS[name]} {measured:.4f} < --min-metric {name}={least:g}"
    if gates.min_cosine is None:
        return None
    if gates.source:
        gate = f"{gates.min_cosine:.6g} (the {gates.source}'s gate{OTHER_GATES})"
    else:
        gate = (f"{gates.min_cosine:g} (the default gate{OTHER_GATES})" if gates.default
                else f"--min-cosine {gates.min_cosine:g}")
    if integer and metrics["agreement"] < gates.min_cosine:
        return f"{metrics['agreement']:.2%} of elements agree exactly < {gate}"
    if not integer and metrics["cosine"] < gates.min_cosine:
        return f"cosine {metrics['cosine']:.6f} < {gate}"
    return None


class ReferenceFailed(OnnxlrError):
    """onnxruntime cannot run the reference model on the feeds on the first provider: the inputs are at fault
    (exit 2; synthesized inputs of other sizes may run)."""


def verify(reference: str | os.PathLike | bytes, candidate: str | os.PathLike | bytes,
           feeds: Mapping[str, np.ndarray], providers: Sequence[str], gates: Gates,
           batch_size: int = 16, per_layer: Sequence[str] = (), threads: int = 0,
           synthesized: bool = False, reference_model: Any = None, segment_budget: int | None = None,
           min_layer_cosine: float | None = None, labels: np.ndarray | None = None,
           pairs: Any = None) -> VerificationResult:
    """Run both models on each provider and compare (metrics: see the module doc).

    `segment_budget` (bytes of weights): models given as paths run in segments of at most that much, one
    onnxruntime session at a time (onnxlr.verification.segments), for models that do not fit in memory whole.

    The reference runs first: when it fails, the inputs are at fault (OnnxlrError, exit 2, naming the
    input: `reference_model`, the reference loaded with onnx-ir, traces a failing node to it); when
    only the candidate fails (loads, lacks an output or raises), that is a failed verification.
    `per_layer` names intermediate tensors present in both models (the outputs of factorized
    nodes); they are exposed as extra outputs and compared too.

    `pairs` (onnxlr.model_io.text.ScoredPairs) run through both sessions beside `feeds`, for the Spearman metrics of
    embedding outputs (not when the models run in segments).

    Models run in segments also get the per-layer check (onnxlr.verification.layer_check: each factorized layer on the original's
    inputs, worst first, in `layer_checks`); `min_layer_cosine` gates on it, running the models as one segment
    when no budget asks for more.
    """
    paths = not isinstance(reference, bytes) and not isinstance(candidate, bytes)
    if min_layer_cosine is not None and segment_budget is None and paths:
        segment_budget = 1 << 62  # one segment: the whole model, with the layers' values observed
    segmented = segment_budget is not None and paths
    if segmented:  # the extra outputs are asked of the segments' runs; the files stay as they are
        reference_bytes, candidate_bytes = reference, candidate
    else:
        reference_bytes = _with_outputs(reference, per_layer) if per_layer else reference
        candidate_bytes = _with_outputs(candidate, per_layer) if per_layer else candidate
    result = VerificationResult(passed=True, gated=False, providers={}, gates=dataclasses.asdict(gates),
                                samples=_sample_count(feeds), failures=[],
                                inputs={name: list(np.shape(a)) for name, a in feeds.items()}, synthesized=synthesized)
    cpu_reference: dict[str, np.ndarray] | None = None
    for provider in providers:
        ref_pairs: dict[str, np.ndarray] = {}  # the scored pairs' outputs (not in segments)
        cand_pairs: dict[str, np.ndarray] = {}
        try:
            if segmented:
                assert segment_budget is not None and not isinstance(reference, bytes)  # segmented: both are paths, with a budget
                assert not isinstance(candidate, bytes)
                outputs = _graph_outputs(reference)
                names = outputs + [n for n in per_layer if n not in outputs]
                check = _layer_check(reference, candidate, feeds, batch_size, provider, threads)
                ref_out = _run_segmented(reference, feeds, batch_size, names, segment_budget, provider, threads,
                                         check)
            else:
                ref_session = make_session(reference_bytes, provider, threads)
                names = [o.name for o in ref_session.get_outputs()]
                ref_out = run_all(ref_session, feeds, batch_size, names)
                ref_pairs = run_all(ref_session, pairs.feeds, batch_size, names) if pairs is not None else {}
                del ref_session  # one model in memory at a time
        except (MemoryError, OnnxlrError):
            raise
        except Exception as exc:  # the input model itself fails (bad attributes, shapes): bad input, not a bug
            error = input_error(exc, feeds, f"onnxruntime cannot run the reference model on {provider}",
                                SYNTHESIZED_HINT if synthesized else GIVEN_HINT, reference_model)
            if result.providers:  # it ran on an earlier provider: other inputs would not help (no probing)
                raise OnnxlrError(error.template) from exc
            raise ReferenceFailed(error.template) from exc
        try:
            if segmented:
                assert segment_budget is not None and not isinstance(candidate, bytes)  # segmented: both are paths, with a budget
                cand_providers = [PROVIDERS[provider]]
                cand_out = _run_segmented(candidate, feeds, batch_size, names, segment_budget, provider, threads)
            else:
                cand_session, cand_out = _run_candidate(candidate_bytes, provider, threads, feeds, batch_size, names)
                cand_providers = cand_session.get_providers()
                cand_pairs = run_all(cand_session, pairs.feeds, batch_size, names) if pairs is not None else {}
        except MemoryError:
            raise
        except Exception as exc:  # the reference ran on these inputs: the candidate is at fault
            result.passed = False
            result.failures.append(f"the candidate fails on {provider}: {error_text(exc)}")
            result.providers[provider] = {"session_providers": [], "outputs": {}, "layers": {}, "error": error_text(exc)}
            if segmented:  # which layers fail, from the check that ran beside the reference
                result.providers[provider]["layer_checks"] = check.results(min_layer_cosine)
                result.failures += summary_failures(result.providers[provider]["layer_checks"], min_layer_cosine,
                                                    provider)
            continue
        model_outputs = [n for n in names if n not in per_layer]
        mask, ids = attention_mask(feeds), token_ids(feeds)
        pairs_mask = attention_mask(pairs.feeds) if pairs is not None else None
        ref_out, cand_out = without_padding(ref_out, mask), without_padding(cand_out, mask)
        entry: dict[str, Any] = {"session_providers": cand_providers, "outputs": {}, "layers": {}}
        if segmented:
            entry["segment_budget_bytes"] = segment_budget
            entry["layer_checks"] = check.results(min_layer_cosine)
            result.failures += summary_failures(entry["layer_checks"], min_layer_cosine, provider)
            result.passed = result.passed and all(row["passed"] for row in entry["layer_checks"])
        for name in names:
            extra = (pair_metrics(ref_pairs[name], cand_pairs[name], pairs.scores, pairs_mask, name)
                     if pairs is not None and name in ref_pairs and name in model_outputs else None)
            metrics = compare_arrays(ref_out[name], cand_out[name], gates if name in model_outputs else Gates(),
                                     name=name, labels=labels if name in model_outputs else None,
                                     mask=mask if name in model_outputs else None,
                                     token_ids=ids if name in model_outputs else None, extra=extra)
            (entry["outputs"] if name in model_outputs else entry["layers"])[name] = metrics
            if name in model_outputs and metrics.get("gated"):
                result.gated = True
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


def _graph_outputs(model: str | os.PathLike) -> list[str]:
    return [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]


def _layer_check(reference: str | os.PathLike, candidate: str | os.PathLike, feeds: Mapping[str, np.ndarray],
                 batch_size: int, provider: str, threads: int) -> LayerCheck:
    """The per-layer check, or one with no layers when the candidate cannot be read (its own run says why)."""
    from onnxlr.verification.segments import value_types

    proto = onnx.load(str(reference), load_external_data=False)
    count = len(list(batches(feeds, batch_size)))
    try:
        return LayerCheck(candidate, proto, count, value_types(proto), provider, threads)
    except Exception as exc:  # a candidate onnx cannot parse: the candidate's run fails and reports it
        logger.info("no per-layer check: %s", error_text(exc))
        return LayerCheck(reference, proto, count, {}, provider, threads, candidate_model=onnx.ModelProto())


def _run_segmented(model: str | os.PathLike, feeds: Mapping[str, np.ndarray], batch_size: int, names: Sequence[str],
                   budget: int, provider: str, threads: int, check: LayerCheck | None = None) -> dict[str, np.ndarray]:
    """run_all's result, the model run in segments of at most `budget` bytes of weights (onnxlr.verification.segments); `check`
    observes the layers' values as they are made."""
    from onnxlr.verification.segments import run_in_segments

    parts = run_in_segments(model, list(batches(feeds, batch_size)), names, budget, provider, threads,
                            observe=check.watched if check else (), on_value=check.take if check else None)
    return {name: (np.concatenate([p[name] for p in parts]) if parts[0][name].ndim and len(parts) > 1
                   else parts[0][name]) for name in names}


def _run_candidate(candidate: str | os.PathLike | bytes, provider: str, threads: int,
                   feeds: Mapping[str, np.ndarray], batch_size: int, names: Sequence[str]) -> tuple[Any, dict]:
    session = make_session(candidate, provider, threads)
    missing = set(names) - {o.name for o in session.get_outputs()}
    if missing:
        raise OnnxlrError(f"it lacks output(s) {', '.join(sorted(missing))}")
    return session, run_all(session, feeds, batch_size, names)


def _noise(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    metrics = compare_arrays(a, b, Gates())
    return {k: metrics[k] for k in ("max_abs", "mean_abs", "cosine") if k in metrics}


def _sample_count(feeds: Mapping[str, np.ndarray]) -> int:
    # The largest first dim: a state input (2, batch, ...) has a small fixed one that is not the sample count.
    counts = [len(a) for a in feeds.values() if a.ndim]
    return max(counts) if counts else 1


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
