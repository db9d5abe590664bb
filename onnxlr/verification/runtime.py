"""Runtime: onnxruntime execution providers, sessions, and running a model over its inputs in batches.

`make_session` refuses a silent fallback (asking for cuda and running on cpu is an error), and
keeps onnxruntime's own errors to one short line. Every stage that runs a model (calibration,
verification, bench) makes its sessions here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

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
                 profile_prefix: str | None = None, prepack: bool = True):
    """An onnxruntime session that really runs on `provider` (a silent fallback to CPU is an error).

    `external_data_folder`: where a model given as bytes finds its external data (its file's folder).
    `prepack=False`: weights stay as they are (a session run a few times only: the segments of onnxlr.verification.segments; on an
    8B fp16 model's 224 MB segment prepacking took 1.5 s of the session's 1.9 s)."""
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
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if external_data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(external_data_folder))
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=[wanted])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxlrError(f"onnxruntime cannot load the model on {provider}: {error_text(exc)}") from exc
    if session.get_providers()[0] != wanted:
        raise OnnxlrError(f"asked for {provider} but onnxruntime runs the model on {session.get_providers()[0]}")
    return session


# Hints for input_error: what the user passes instead.
SYNTHESIZED_HINT = "pass --shape {name}:DIMS or --inputs FILE.npz"
GIVEN_HINT = "check the arrays of --inputs FILE.npz (or leave it out and pass --shape {name}:DIMS)"
ERROR_TEXT_LIMIT = 1000


def error_text(exc: BaseException, limit: int = ERROR_TEXT_LIMIT) -> str:
    """An exception's message on one line (onnxruntime's run over several: the useful part is often later)."""
    text = exc.cli_message() if isinstance(exc, OnnxlrError) else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shape_text(array: Any) -> str:
    return "x".join(map(str, np.shape(array))) or "scalar"


def input_error(exc: BaseException, feeds: Mapping[str, np.ndarray], lead: str, hint: str = SYNTHESIZED_HINT,
                model: Any = None) -> OnnxlrError:
    """One line for a model that onnxruntime cannot run on `feeds`: `lead` (what failed), onnxruntime's reason,
    the input at fault (when onnxruntime's message, or the failing node's ancestry in `model` (onnx-ir), tells
    which; else every input fed) with its shape, and `hint` (`{name}`: that input's name) on what to pass."""
    reason = error_text(exc)
    culprits = culprit_inputs(reason, feeds, model)
    names = culprits or list(feeds)
    described = ", ".join(f"{name!r} {shape_text(feeds[name])} ({np.asarray(feeds[name]).dtype})" for name in names)
    if len(culprits) == 1:
        subject = f"input {culprits[0]!r} fed as {shape_text(feeds[culprits[0]])} ({np.asarray(feeds[culprits[0]]).dtype})"
    else:
        subject = f"inputs fed: {described or 'none'}"
    advice = hint.replace("{name}", names[0] if len(names) == 1 else "NAME")
    return OnnxlrError(f"{lead}: {reason}; {subject}; {advice}")


_NAMED_INPUT = re.compile(r"(?:for input|[Ii]nput name|Feed Input Name)\s*[:=]?\s*'?([^\s',]+)")
_NODE_NAME = re.compile(r"Name:\s*'([^']*)'")


def culprit_inputs(reason: str, feeds: Mapping[str, np.ndarray], model: Any = None) -> list[str]:
    """The fed inputs an onnxruntime message points at: named in it, or the inputs the failing node reads
    (directly or through other nodes of `model`). Empty when it cannot tell."""
    named = [m for m in _NAMED_INPUT.findall(reason) if m in feeds]
    if named:
        return list(dict.fromkeys(named))
    node_name = _NODE_NAME.search(reason)
    if node_name is None or model is None:
        return []
    return _ancestor_inputs(model, node_name.group(1), feeds)


def _ancestor_inputs(model: Any, node_name: str, feeds: Mapping[str, np.ndarray]) -> list[str]:
    """The fed graph inputs the main-graph node `node_name` reads, directly or through other nodes."""
    pending = [node for node in model.graph if node.name == node_name][:1]
    seen: set[int] = set()
    found: set[str] = set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in node.inputs:
            if value is not None and value.is_graph_input():
                found.add(value.name)
            elif value is not None and value.producer() is not None:
                pending.append(value.producer())
    return [name for name in feeds if name in found]  # in the feeds' order


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
