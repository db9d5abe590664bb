"""Activation statistics for data-aware factorization, from calibration data run through onnxruntime.

For every MatMul/Gemm target of the main graph, the input the weight multiplies is exposed as an
extra graph output of a copy of the ORIGINAL model. Each batch's activations are reduced at once
to the running float64 second moment G = sum x x^T over the K-vectors the weight multiplies, so
memory stays at one (K, K) matrix per target whatever the amount of data:

  MatMul right  X (..., K) · W (K, N)     the rows of X
  MatMul left   W (M, K) · X (..., K, N)  the columns of X
  Gemm B        op(A) (M, K) · op(B)      the rows of op(A)
  Gemm A        op(A) · op(B) (K, N)      the columns of op(B)

Statistics are keyed by the target node's first output name (unique in the main graph); targets
inside subgraphs get none and are factorized with the plain SVD.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxlr.errors import OnnxlrError
from onnxlr.passes import PASSES, Context, Skip
from onnxlr.passes.base import attribute

# Which side of the matrix view the activation vectors enter (see lowrank.whitened_svd).
INPUT_SIDE = {"right": "rows", "B": "rows", "left": "cols", "A": "cols"}
CALIBRATED_OPS = ("MatMul", "Gemm")


@dataclasses.dataclass
class Probe:
    """One target's activation: which value to fetch and how to turn it into K-vectors."""

    key: str  # the target node's first output name
    activation: str  # the value name exposed as an extra output
    layout: str  # "rows": vectors along the last axis; "cols": along the second-to-last axis


@dataclasses.dataclass
class GramAccumulator:
    """Running sum of x x^T (float64) over the vectors seen so far."""

    gram: np.ndarray | None = None
    count: int = 0

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float64)
        if self.gram is None:
            self.gram = np.zeros((vectors.shape[1], vectors.shape[1]))
        self.gram += vectors.T @ vectors
        self.count += len(vectors)


def probes(model: ir.Model) -> list[Probe]:
    """The main-graph MatMul/Gemm nodes with a constant weight, and how their activations are read."""
    context = Context(shapes={}, opset=int(model.opset_imports.get("", 1)))
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in CALIBRATED_OPS:
            continue
        try:
            target = PASSES[node.op_type]().match(node, context)
        except Skip:
            continue
        activation, layout = _activation(node, target.role)
        if activation.name and node.outputs[0].name:
            found.append(Probe(key=node.outputs[0].name, activation=activation.name, layout=layout))
    return found


def _activation(node: ir.Node, role: str) -> tuple[ir.Value, str]:
    if role == "right":
        return node.inputs[0], "rows"
    if role == "left":
        return node.inputs[1], "cols"
    if role == "B":  # rows of op(A): A's columns when transA is set
        return node.inputs[0], "cols" if attribute(node, "transA", 0) else "rows"
    # role A: columns of op(B), i.e. B's rows when transB is set
    return node.inputs[1], "rows" if attribute(node, "transB", 0) else "cols"


def vectors(array: np.ndarray, layout: str) -> np.ndarray:
    """The (count, K) vectors an activation holds for its weight."""
    if layout == "cols" and array.ndim >= 2:
        array = np.swapaxes(array, -1, -2)
    return array.reshape(-1, array.shape[-1])


# ----------------------------------------------------------------------------- calibration data


def feed_batches(source: Any, specs: Mapping[str, Any], batch_size: int, samples: int | None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of input feeds from an .npz, a folder of .npz files or an iterable of dicts, up to `samples`."""
    left = samples
    for feeds in _feed_sets(source, specs):
        count = min((len(a) for a in feeds.values() if a.ndim), default=1)
        for start in range(0, count, batch_size):
            take = min(batch_size, count - start) if left is None else min(batch_size, count - start, left)
            if take <= 0:
                return
            yield {name: (a[start:start + take] if a.ndim else a) for name, a in feeds.items()}
            if left is not None:
                left -= take


def _feed_sets(source: Any, specs: Mapping[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    from onnxlr.verify import load_inputs

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise OnnxlrError(f"{path}: no .npz files in the calibration folder")
            for file in files:
                yield load_inputs(file, specs)
        else:
            yield load_inputs(path, specs)
        return
    if isinstance(source, Mapping):
        source = [source]
    for index, feeds in enumerate(source):
        yield _checked(feeds, specs, f"calibration item {index}")


def _checked(feeds: Any, specs: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    if not isinstance(feeds, Mapping):
        raise OnnxlrError(f"{where}: expected a dict of arrays keyed by input name, got {type(feeds).__name__}")
    missing = [name for name in specs if name not in feeds]
    if missing:
        raise OnnxlrError(f"{where}: no array for model input(s) {', '.join(missing)}")
    checked = {}
    for name, spec in specs.items():
        array = np.asarray(feeds[name])
        if array.dtype != spec.dtype or array.ndim != len(spec.shape):
            raise OnnxlrError(f"{where}: input {name!r} is {array.dtype} with {array.ndim} dimensions, "
                              f"the model expects {spec.dtype} with {len(spec.shape)}")
        checked[name] = array
    return checked


# ----------------------------------------------------------------------------- collection


def collect_grams(model_source: str | os.PathLike | bytes, model: ir.Model, data: Any,
                  samples: int | None = None, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Gram matrices (sum of x x^T, float64) by target output name, from running `data` through the model.

    `model_source` is the original model's file (external data is read next to it) or its bytes;
    `model` the same model loaded (onnx-ir), which gives the targets and the input signature.
    """
    from onnxlr.verify import input_specs, make_session

    if samples is not None and samples < 1:
        raise OnnxlrError(f"calibration samples must be a positive integer, got {samples!r}")
    found = probes(model)
    if not found:
        return {}
    specs = input_specs(model)
    proto_bytes, folder = _with_activation_outputs(model_source, {p.activation for p in found})
    session = make_session(proto_bytes, "cpu", external_data_folder=folder)
    names = sorted({p.activation for p in found})
    sums = {p.key: GramAccumulator() for p in found}
    seen = 0
    for batch in feed_batches(data, specs, batch_size, samples):
        try:
            outputs = dict(zip(names, session.run(names, batch)))
        except Exception as exc:  # onnxruntime's own exception types: bad shapes or values
            raise OnnxlrError(f"calibration data does not run through the model: {str(exc).splitlines()[0][:300]}") from exc
        for probe in found:
            sums[probe.key].add(vectors(outputs[probe.activation], probe.layout))
        seen += 1
    if not seen:
        raise OnnxlrError("the calibration data holds no samples")
    return {key: acc.gram for key, acc in sums.items() if acc.gram is not None}


def _with_activation_outputs(source: str | os.PathLike | bytes, names: Iterable[str]) -> tuple[bytes, Path | None]:
    """The model with `names` as extra outputs; external weights stay in their files, next to the model."""
    if isinstance(source, bytes):
        proto, folder = onnx.load_from_string(source), None
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            raise OnnxlrError("calibrating a model with external data needs the model's path (its weights are read there)")
    else:
        proto, folder = onnx.load(str(source), load_external_data=False), Path(source).resolve().parent
    existing = {o.name for o in proto.graph.output}
    for name in sorted(set(names) - existing):
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto.SerializeToString(), folder
