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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


@dataclasses.dataclass(frozen=True)
class Gates:
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None


# ----------------------------------------------------------------------------- providers and sessions


def default_providers() -> list[str]:
    """cpu, plus cuda when onnxruntime-gpu is installed and a GPU is visible."""
    import onnxruntime as ort

    names = ["cpu"]
    if PROVIDERS["cuda"] in ort.get_available_providers() and _gpu_visible():
        names.append("cuda")
    return names


def _gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def parse_providers(names: Sequence[str] | None) -> list[str]:
    if not names:
        return default_providers()
    unknown = [n for n in names if n.lower() not in PROVIDERS]
    if unknown:
        raise OnnxlrError(f"unknown execution provider {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    return [n.lower() for n in names]


def make_session(model: str | os.PathLike | bytes, provider: str, threads: int = 0,
                 optimization_level: str = "all", external_data_folder: str | os.PathLike | None = None,
                 profile_prefix: str | None = None):
    """An onnxruntime session that really runs on `provider` (a silent fallback to CPU is an error).

    `external_data_folder`: where a model given as bytes finds its external data (its file's folder)."""
    import onnxruntime as ort

    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        hint = " (pip uninstall onnxruntime; pip install 'onnxlr[gpu]')" if provider == "cuda" else ""
        raise OnnxlrError(f"execution provider {provider} is not available in this onnxruntime{hint}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors reach the caller as exceptions (one short message), not as log lines
    if profile_prefix:  # onnxruntime's per-node profiler (bench --profile)
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization_level]
    if external_data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(external_data_folder))
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=[wanted])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxlrError(f"onnxruntime cannot load the model on {provider}: {str(exc).splitlines()[0][:300]}") from exc
    if session.get_providers()[0] != wanted:
        raise OnnxlrError(f"asked for {provider} but onnxruntime runs the model on {session.get_providers()[0]}")
    return session


# ----------------------------------------------------------------------------- inputs


def load_inputs(path: str | os.PathLike, input_specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Arrays keyed by input name from an .npz file (samples along the first axis), checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise OnnxlrError(f"{path}: no such input file (expected an .npz of arrays keyed by input name)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:
        raise OnnxlrError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from exc
    missing = [name for name in input_specs if name not in arrays]
    if missing:
        raise OnnxlrError(f"{path}: no array for model input(s) {', '.join(missing)} (has {', '.join(arrays)})")
    feeds = {}
    for name, spec in input_specs.items():
        array = arrays[name]
        if array.dtype != spec.dtype:
            raise OnnxlrError(f"{path}: input {name!r} is {array.dtype} but the model expects {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise OnnxlrError(f"{path}: input {name!r} has {array.ndim} dimensions, the model expects {len(spec.shape)}")
        feeds[name] = array
    counts = {len(a) for a in feeds.values() if a.ndim}
    if len(counts) > 1:
        raise OnnxlrError(f"{path}: inputs have different sample counts {sorted(counts)}")
    return feeds


# A synthesized input larger than this is refused (a huge or hostile declared dim), not allocated.
MAX_SYNTHESIZED_BYTES = 2**31


@dataclasses.dataclass
class InputSpec:
    dtype: np.dtype
    shape: tuple  # ints or None/str for dynamic
    high: int | None = None  # exclusive upper bound for integer ids (from an embedding table)


def input_specs(model: ir.Model) -> dict[str, InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
    specs = {}
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        if value.type is None or not hasattr(value.type, "dtype"):
            raise OnnxlrError(f"input {value.name!r} is not a tensor; onnxlr can only feed tensors")
        shape = tuple(d if isinstance(d, int) else None for d in (value.shape or []))
        specs[value.name] = InputSpec(dtype=np.dtype(value.type.dtype.numpy()), shape=shape,
                                      high=_embedding_rows(value))
    return specs


def _embedding_rows(value: ir.Value, depth: int = 0) -> int | None:
    """If the value (through casts/reshapes) indexes a constant Gather table, that table's size."""
    for node in value.consumers():
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is value:
            table = node.inputs[0]
            if table is not None and table.const_value is not None:
                axis = node.attributes.get("axis")
                return int(table.const_value.shape[axis.value if axis else 0])
        if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity") and depth < 4:
            found = _embedding_rows(node.outputs[0], depth + 1)
            if found:
                return found
    return None


def parse_shape_overrides(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """`--shape name:1x128` -> {"name": (1, 128)}."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            parsed = tuple(int(d) for d in dims.lower().split("x")) if sep and name else None
        except ValueError:
            parsed = None
        if not parsed or any(d < 0 for d in parsed):
            raise OnnxlrError(f"--shape {item!r}: expected NAME:DIMxDIM..., e.g. input_ids:1x128")
        shapes[name] = parsed
    return shapes


def synthesize_inputs(specs: Mapping[str, InputSpec], seed: int = 0, samples: int = 2,
                      shapes: Mapping[str, tuple[int, ...]] | None = None,
                      default_dim: int = 16) -> dict[str, np.ndarray]:
    """Random inputs from the model's signature: floats ~ N(0, 1), ids inside the embedding table,
    masks all ones, booleans random. Dynamic dims: the first is `samples`, the others `default_dim`."""
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    unknown = [name for name in shapes if name not in specs]
    if unknown:
        raise OnnxlrError(f"--shape names unknown input(s) {', '.join(unknown)}; inputs are {', '.join(specs)}")
    feeds = {}
    for name, spec in specs.items():
        if name in shapes:
            shape = shapes[name]
            if len(shape) != len(spec.shape) or any(s is not None and s != d for s, d in zip(spec.shape, shape)):
                raise OnnxlrError(f"--shape {name}:{'x'.join(map(str, shape))} does not fit the input's shape {spec.shape}")
        else:
            shape = tuple(d if d is not None else (samples if i == 0 else default_dim) for i, d in enumerate(spec.shape))
        if any(d < 0 for d in shape):
            raise OnnxlrError(f"input {name!r} declares a negative dimension {spec.shape}: not a valid ONNX model")
        nbytes = math.prod(shape) * spec.dtype.itemsize
        if nbytes > MAX_SYNTHESIZED_BYTES:
            hint = f"--shape {name}:DIMS or " if None in spec.shape else ""
            raise OnnxlrError(f"input {name!r} of shape {'x'.join(map(str, shape))} would take {nbytes} bytes to "
                              f"synthesize; pass {hint}--inputs FILE.npz")
        feeds[name] = _random_array(name, spec, shape, rng)
    return feeds


def _random_array(name: str, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if kind in "iu":
        lowered = name.lower()
        if "mask" in lowered:
            return np.ones(shape, dtype=spec.dtype)
        if "type" in lowered or "segment" in lowered:
            return np.zeros(shape, dtype=spec.dtype)
        high = spec.high or 2
        return rng.integers(0, high, shape).astype(spec.dtype)
    if kind in "OUS":  # strings: short random numerals
        return rng.integers(0, 100, shape).astype(str).astype(object)
    raise OnnxlrError(f"cannot synthesize input {name!r} of dtype {spec.dtype}; pass --inputs FILE.npz")


def batches(feeds: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    count = min(len(a) for a in feeds.values() if a.ndim) if any(a.ndim for a in feeds.values()) else 1
    for start in range(0, max(count, 1), batch_size):  # zero samples (a 0-sized first dim): one empty run
        yield {name: (a[start:start + batch_size] if a.ndim else a) for name, a in feeds.items()}


# ----------------------------------------------------------------------------- metrics


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


# ----------------------------------------------------------------------------- running and comparing


def run_all(session, feeds: Mapping[str, np.ndarray], batch_size: int, output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run every batch and concatenate each output along the first axis."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    # Inputs whose first dim is static take exactly that many samples per run (a batch-1 model, one by one).
    firsts = [i.shape[0] if i.shape else None for i in session.get_inputs() if i.name in feeds and feeds[i.name].ndim]
    if firsts and len(set(firsts)) == 1 and isinstance(firsts[0], int) and firsts[0] > 0:
        batch_size = firsts[0]
    for batch in batches(feeds, batch_size):
        for name, value in zip(output_names, session.run(list(output_names), batch)):
            parts[name].append(np.asarray(value))
    return {name: (np.concatenate(v) if v[0].ndim and len(v) > 1 else v[0]) for name, v in parts.items()}


def verify(reference: str | os.PathLike | bytes, candidate: str | os.PathLike | bytes,
           feeds: Mapping[str, np.ndarray], providers: Sequence[str], gates: Gates,
           batch_size: int = 16, per_layer: Sequence[str] = (), threads: int = 0) -> dict[str, Any]:
    """Run both models on each provider and compare; returns the verification dict (see module doc).

    `per_layer` names intermediate tensors present in both models (the outputs of factorized
    nodes); they are exposed as extra outputs and compared too.
    """
    reference_bytes = _with_outputs(reference, per_layer) if per_layer else reference
    candidate_bytes = _with_outputs(candidate, per_layer) if per_layer else candidate
    result: dict[str, Any] = {"passed": True, "providers": {}, "gates": dataclasses.asdict(gates),
                              "samples": _sample_count(feeds), "failures": []}
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
                result["passed"] = False
                result["failures"].append(f"output {name!r} on {provider}: {metrics['failure']}")
        if provider == "cpu":
            cpu_reference = ref_out
        elif cpu_reference is not None:
            # Provider noise, separate from factorization error: this provider's reference vs the CPU's.
            entry["reference_vs_cpu"] = {n: _noise(cpu_reference[n], ref_out[n]) for n in model_outputs}
        result["providers"][provider] = entry
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
