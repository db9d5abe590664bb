"""Activation statistics for data-aware factorization, from calibration data run through onnxruntime.

For every MatMul/Gemm/Conv target of the main graph, the input the weight multiplies is exposed
as an extra graph output of a copy of the ORIGINAL model. Each batch's activations are reduced at
once to the running float64 second moment G = sum x x^T over the K-vectors the weight multiplies,
so memory stays at one (K, K) matrix per target whatever the amount of data:

  MatMul right  X (..., K) · W (K, N)     the rows of X
  MatMul left   W (M, K) · X (..., K, N)  the columns of X
  Gemm B        op(A) (M, K) · op(B)      the rows of op(A)
  Gemm A        op(A) · op(B) (K, N)      the columns of op(B)
  Conv          W (Cout/g, Cin/g·k) · p   the patches p the kernel sees (one Gram per group), read
                                          by an extra one-hot depthwise Conv with the node's own
                                          pads, strides, dilations and auto_pad, so they are exact

When the model has a 2-D `attention_mask` input, rows of [batch, seq, K] activations at masked
(padding) positions are left out: the model ignores them, so the factorization should too.

The same probe model can take each target's weight as a feed (`Runner(..., slots=...)`): that
measures a factorization (feed A @ B) without rewriting the graph, for error compensation
(statistics of the partially compressed model), sensitivity and the `--target-cosine` search.
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
INPUT_SIDE = {"right": "rows", "B": "rows", "left": "cols", "A": "cols", "kernel": "cols"}
CALIBRATED_OPS = ("MatMul", "Gemm", "Conv")
# The Conv scheme whose matrix view multiplies the patches: the only one calibration can whiten.
CONV_WHITENED_SCHEME = "output"
MASK_INPUT_NAME = "attention_mask"


@dataclasses.dataclass
class Probe:
    """One target's activation: which value to fetch and how to turn it into K-vectors."""

    key: str  # the target node's first output name
    activation: str  # the value name exposed as an extra output
    layout: str  # "rows": along the last axis; "cols": along the second-to-last; "patches": unfolded conv
    groups: int = 1  # conv groups: one Gram per group
    unfold: dict | None = None  # conv only: how to build the one-hot Conv that reads the patches


@dataclasses.dataclass
class GramAccumulator:
    """Running sum of x x^T (float64) over the vectors seen so far; one per group for a conv."""

    gram: np.ndarray | None = None
    count: int = 0

    def add(self, vectors: np.ndarray) -> None:
        stack = _as_stack(vectors)
        if self.gram is None:
            self.gram = np.zeros((stack.shape[0], stack.shape[2], stack.shape[2]))
        self.gram += np.matmul(stack.transpose(0, 2, 1), stack)
        self.count += stack.shape[1]

    def result(self) -> np.ndarray | None:
        """(K, K), or (groups, K, K) for a grouped conv."""
        if self.gram is None:
            return None
        return self.gram[0] if len(self.gram) == 1 else self.gram


@dataclasses.dataclass
class CrossAccumulator:
    """Error compensation: G_c = sum x_c x_c^T and C = sum x_c x_o^T (x_c compressed, x_o original input)."""

    gram: GramAccumulator = dataclasses.field(default_factory=GramAccumulator)
    cross: np.ndarray | None = None

    def add(self, compressed: np.ndarray, original: np.ndarray) -> None:
        xc, xo = _as_stack(compressed), _as_stack(original)
        self.gram.add(xc)
        if self.cross is None:
            self.cross = np.zeros((xc.shape[0], xc.shape[2], xc.shape[2]))
        self.cross += np.matmul(xc.transpose(0, 2, 1), xo)

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.cross is None:
            return None
        return self.gram.result(), (self.cross[0] if len(self.cross) == 1 else self.cross)


def _as_stack(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors[None] if vectors.ndim == 2 else vectors


def probes(model: ir.Model) -> list[Probe]:
    """The main-graph MatMul/Gemm/Conv nodes with a constant weight, and how their activations are read."""
    context = Context(shapes={}, opset=int(model.opset_imports.get("", 1)))
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in CALIBRATED_OPS:
            continue
        try:
            target = PASSES[node.op_type]().match(node, context)
        except Skip:
            continue
        if not node.outputs[0].name:
            continue
        if target.role == "kernel":
            found.append(_conv_probe(node, target.array, target.dtype, len(found)))
            continue
        activation, layout = _activation(node, target.role)
        if activation.name:
            found.append(Probe(key=node.outputs[0].name, activation=activation.name, layout=layout))
    return found


def _conv_probe(node: ir.Node, kernel: np.ndarray, dtype: ir.DataType, index: int) -> Probe:
    group = int(attribute(node, "group", 1))
    cin, spatial = kernel.shape[1] * group, kernel.shape[2:]
    attrs = {"kernel_shape": list(spatial), "group": cin}
    for name in ("strides", "dilations", "pads", "auto_pad"):
        if name in node.attributes:
            value = node.attributes[name].value
            attrs[name] = value.decode() if isinstance(value, bytes) else value
    unfold = {"input": node.inputs[0].name, "channels": cin, "spatial": tuple(spatial),
              "dtype": dtype.numpy(), "attributes": attrs}
    return Probe(key=node.outputs[0].name, activation=f"onnxlr_calibration_patches_{index}", layout="patches",
                 groups=group, unfold=unfold)


def _activation(node: ir.Node, role: str) -> tuple[ir.Value, str]:
    if role == "right":
        return node.inputs[0], "rows"
    if role == "left":
        return node.inputs[1], "cols"
    if role == "B":  # rows of op(A): A's columns when transA is set
        return node.inputs[0], "cols" if attribute(node, "transA", 0) else "rows"
    # role A: columns of op(B), i.e. B's rows when transB is set
    return node.inputs[1], "rows" if attribute(node, "transB", 0) else "cols"


def vectors(array: np.ndarray, layout: str, groups: int = 1, keep: np.ndarray | None = None) -> np.ndarray:
    """The (count, K) vectors an activation holds for its weight; (groups, count, K) for conv patches.

    `keep` (rows layout only): a boolean mask over the leading [batch, seq] positions.
    """
    if layout == "patches":  # (N, groups*K, *out) -> (groups, N*positions, K)
        n, channels = array.shape[:2]
        per_group = array.reshape(n, groups, channels // groups, -1)
        return per_group.transpose(1, 0, 3, 2).reshape(groups, -1, channels // groups)
    if layout == "cols" and array.ndim >= 2:
        array = np.swapaxes(array, -1, -2)
    if keep is not None and layout == "rows" and array.ndim == 3 and array.shape[:2] == keep.shape:
        return array[keep]
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
                yield _finite(load_inputs(file, specs), str(file))
        else:
            yield _finite(load_inputs(path, specs), str(path))
        return
    if isinstance(source, Mapping):
        source = [source]
    for index, feeds in enumerate(source):
        where = f"calibration item {index}"
        yield _finite(_checked(feeds, specs, where), where)


def _finite(feeds: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Refuse NaN/Inf in calibration inputs: they would poison every second-moment statistic."""
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise OnnxlrError(f"{where}: input {name!r} holds NaN or Inf values; calibration data must be finite")
    return feeds


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


# ----------------------------------------------------------------------------- the probe model


@dataclasses.dataclass
class Slot:
    """A weight that calibration may replace by a feed: every target node (by output name) that reads it."""

    keys: list[str]
    weight_input: int  # which node input carries the weight
    array: np.ndarray  # the weight as the nodes read it (constant chains folded)


class Runner:
    """One onnxruntime session of the original model with every probe's activation as an extra output.

    With `slots`, each slot's weight is a graph input (its initializer the default), so `run` can
    feed a factorized weight in its place without rebuilding the session.
    """

    def __init__(self, model_source: str | os.PathLike | bytes, model: ir.Model, found: list[Probe],
                 slots: list[Slot] = ()):
        from onnxlr.verify import input_specs, make_session

        self.specs = input_specs(model)
        self.outputs = [value.name for value in model.graph.outputs]
        self.probes = {probe.key: probe for probe in found}
        proto_bytes, folder, self.slot_inputs = _probe_model(model_source, found, list(slots))
        self.session = make_session(proto_bytes, "cpu", external_data_folder=folder)
        mask = self.specs.get(MASK_INPUT_NAME)
        self.mask_input = MASK_INPUT_NAME if mask is not None and len(mask.shape) == 2 else None

    def run(self, batch: Mapping[str, np.ndarray], names: Iterable[str],
            overrides: Mapping[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Fetch `names` for one batch; `overrides` maps slot index -> the weight to use instead."""
        feeds = dict(batch)
        for index, array in (overrides or {}).items():
            feeds[self.slot_inputs[index]] = array
        names = list(dict.fromkeys(names))
        try:
            return dict(zip(names, self.session.run(names, feeds)))
        except Exception as exc:  # onnxruntime's own exception types: bad shapes or values
            raise OnnxlrError(f"calibration data does not run through the model: {str(exc).splitlines()[0][:300]}") from exc

    def keep(self, batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The non-padding [batch, seq] positions, when the model has an attention mask input."""
        return batch[self.mask_input] != 0 if self.mask_input else None

    def vectors(self, key: str, outputs: Mapping[str, np.ndarray], keep: np.ndarray | None) -> np.ndarray:
        probe = self.probes[key]
        return vectors(outputs[probe.activation], probe.layout, probe.groups, keep)


def _probe_model(source: str | os.PathLike | bytes, found: list[Probe], slots: list[Slot]
                 ) -> tuple[bytes, Path | None, list[str]]:
    """The model with the probes' activations as extra outputs and the slots' weights as inputs.

    External weights stay in their files, next to the model (the serialized copy references them).
    """
    if isinstance(source, bytes):
        proto, folder = onnx.load_from_string(source), None
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            raise OnnxlrError("calibrating a model with external data needs the model's path (its weights are read there)")
    else:
        proto, folder = onnx.load(str(source), load_external_data=False), Path(source).resolve().parent
    graph = proto.graph
    existing = {o.name for o in graph.output}
    for probe in found:
        if probe.unfold is not None:
            _add_unfold(graph, probe)
        if probe.activation not in existing:
            graph.output.append(onnx.ValueInfoProto(name=probe.activation))
            existing.add(probe.activation)
    slot_inputs = [_expose_slot(graph, slot, index) for index, slot in enumerate(slots)]
    return proto.SerializeToString(), folder, slot_inputs


def _add_unfold(graph: onnx.GraphProto, probe: Probe) -> None:
    """A depthwise one-hot Conv whose output channel c*K + k is input channel c at kernel tap k."""
    spec = probe.unfold
    taps = int(np.prod(spec["spatial"]))
    kernel = np.tile(np.eye(taps, dtype=spec["dtype"]), (spec["channels"], 1))
    kernel = kernel.reshape(spec["channels"] * taps, 1, *spec["spatial"])
    kernel_name = probe.activation + "_onehot"
    graph.initializer.append(onnx.numpy_helper.from_array(kernel, kernel_name))
    graph.node.append(onnx.helper.make_node("Conv", [spec["input"], kernel_name], [probe.activation],
                                            name=probe.activation, **spec["attributes"]))


def _expose_slot(graph: onnx.GraphProto, slot: Slot, index: int) -> str:
    """Make the slot's weight a feedable graph input; returns the input's name."""
    nodes = {node.output[0]: node for node in graph.node if node.output}
    names = {nodes[key].input[slot.weight_input] for key in slot.keys}
    initializers = {init.name: init for init in graph.initializer}
    if len(names) == 1 and (name := names.pop()) in initializers:
        init = initializers[name]  # the nodes read an initializer: declaring it an input makes it feedable
    else:  # a folded constant chain: a new initializer holding its value, read by the nodes instead
        name = f"onnxlr_calibration_weight_{index}"
        init = onnx.numpy_helper.from_array(np.ascontiguousarray(slot.array), name)
        graph.initializer.append(init)
        for key in slot.keys:
            nodes[key].input[slot.weight_input] = name
    if name not in {value.name for value in graph.input}:
        graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    return name


# ----------------------------------------------------------------------------- collection


def load_batches(model: ir.Model, data: Any, samples: int | None = None, batch_size: int = 16
                 ) -> list[dict[str, np.ndarray]]:
    """The calibration data as a list of batches (several passes read it), checked against the model."""
    from onnxlr.verify import input_specs

    if samples is not None and samples < 1:
        raise OnnxlrError(f"calibration samples must be a positive integer, got {samples!r}")
    batches = list(feed_batches(data, input_specs(model), batch_size, samples))
    if not batches:
        raise OnnxlrError("the calibration data holds no samples")
    return batches


def collect_grams(model_source: str | os.PathLike | bytes, model: ir.Model, data: Any,
                  samples: int | None = None, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Gram matrices (sum of x x^T, float64) by target output name, from running `data` through the model.

    `model_source` is the original model's file (external data is read next to it) or its bytes;
    `model` the same model loaded (onnx-ir), which gives the targets and the input signature.
    """
    found = probes(model)
    batches = load_batches(model, data, samples, batch_size)
    if not found:
        return {}
    return grams(Runner(model_source, model, found), batches)


def grams(runner: Runner, batches: Iterable[Mapping[str, np.ndarray]], keys: Iterable[str] | None = None,
          overrides: Mapping[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Gram matrices of the probes `keys` (default: all), with the slot `overrides` fed."""
    keys = list(runner.probes if keys is None else keys)
    sums = {key: GramAccumulator() for key in keys}
    for batch in batches:
        outputs = runner.run(batch, [runner.probes[key].activation for key in keys], overrides)
        keep = runner.keep(batch)
        for key in keys:
            sums[key].add(runner.vectors(key, outputs, keep))
    return {key: acc.result() for key, acc in sums.items() if acc.result() is not None}


def compensation_statistics(runner: Runner, batches: Iterable[Mapping[str, np.ndarray]], keys: Iterable[str],
                            overrides: Mapping[int, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(G_c, C) by probe key: the inputs of the model with `overrides` against the original's inputs."""
    keys = list(keys)
    sums = {key: CrossAccumulator() for key in keys}
    names = [runner.probes[key].activation for key in keys]
    for batch in batches:
        original = runner.run(batch, names)
        compressed = runner.run(batch, names, overrides)
        keep = runner.keep(batch)
        for key in keys:
            sums[key].add(runner.vectors(key, compressed, keep), runner.vectors(key, original, keep))
    return {key: acc.result() for key, acc in sums.items() if acc.result() is not None}


def model_outputs(runner: Runner, batches: Iterable[Mapping[str, np.ndarray]],
                  overrides: Mapping[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The model's own outputs over all batches (concatenated along the first axis)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in runner.outputs}
    for batch in batches:
        for name, value in runner.run(batch, runner.outputs, overrides).items():
            parts[name].append(np.asarray(value))
    return {name: (np.concatenate(v) if v[0].ndim and len(v) > 1 else v[0]) for name, v in parts.items()}
