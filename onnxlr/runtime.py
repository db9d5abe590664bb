"""Runtime: onnxruntime execution providers, sessions, and running a model over its inputs in batches.

`make_session` refuses a silent fallback (asking for cuda and running on cpu is an error), and
keeps onnxruntime's own errors to one short line. Every stage that runs a model (calibration,
verification, bench) makes its sessions here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from onnxlr.errors import OnnxlrError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


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


def batches(feeds: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    count = min(len(a) for a in feeds.values() if a.ndim) if any(a.ndim for a in feeds.values()) else 1
    for start in range(0, max(count, 1), batch_size):  # zero samples (a 0-sized first dim): one empty run
        yield {name: (a[start:start + batch_size] if a.ndim else a) for name, a in feeds.items()}


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
