"""Activation statistics for data-aware factorization, from calibration data run through onnxruntime.

For every MatMul/Gemm/Conv target of the main graph, the input the weight multiplies is exposed
as an extra graph output of a copy of the ORIGINAL model. Each batch's activations are reduced at
once to the running float64 second moment G = sum x x^T over the K-vectors the weight multiplies,
so memory stays at one (K, K) matrix per target whatever the amount of data (block by block, an activation
seen by fewer vectors than half its width keeps the vectors instead, on disk: SampleAccumulator):

  MatMul right  X (..., K) · W (K, N)     the rows of X
  MatMul left   W (M, K) · X (..., K, N)  the columns of X
  Gemm B        op(A) (M, K) · op(B)      the rows of op(A)
  Gemm A        op(A) · op(B) (K, N)      the columns of op(B)
  Conv          W (Cout/g, Cin/g·k) · p   the patches p the kernel sees (one Gram per group), read
                                          by an extra one-hot depthwise Conv with the node's own
                                          pads, strides, dilations and auto_pad, so they are exact

When the model has a 2-D `attention_mask` input, rows of [batch, seq, K] activations at masked
(padding) positions are left out: the model ignores them, so the factorization should too. Which
activations the mask's positions index is decided once, from the graph (`masked_probes`), never
from a batch's shapes: an encoder-decoder's decoder activations are [batch, decoder_seq, K], and a
batch whose two lengths happen to be equal must not lose real decoder rows to the encoder's padding.

The same probe model can take each target's weight as a feed (`Runner(..., slots=...)`): that
measures a factorization (feed A @ B) without rewriting the graph, for error compensation
(statistics of the partially compressed model), sensitivity and the `--target-cosine` search.
Statistics are keyed by the target node's first output name (unique in the main graph); targets
inside subgraphs get none and are factorized with the plain SVD.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx
import onnx_ir as ir

from onnxlr.calibrate.masks import MASK_INPUT_NAME, masked_probes
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank
from onnxlr.model_io.inputs import input_specs, load_batches
from onnxlr.model_io.shapes import default_opset
from onnxlr.passes import RULES, Activation, Context, Skip
from onnxlr.passes.base import inputs_are_weights
from onnxlr.verification.runtime import input_error, make_session

if TYPE_CHECKING:
    from onnxlr.protocols import CalibrationRunner

logger = logging.getLogger(__name__)

CALIBRATION_HINT = "check the arrays of --calibration (and of held-out --inputs) for input {name}"


@dataclasses.dataclass
class Probe:
    """One target's activation: which value to fetch and how to turn it into K-vectors."""

    key: str  # the target node's first output name
    activation: str  # the value name exposed as an extra output
    layout: str  # "rows": along the last axis; "cols": along the second-to-last; "patches": unfolded conv
    groups: int = 1  # conv groups: one Gram per group
    unfold: dict | None = None  # conv only: how to build the one-hot Conv that reads the patches
    node: str = ""  # the target node's name and op type (which probes the memory check counts)
    op: str = ""


@dataclasses.dataclass
class GramAccumulator:
    """Running sum of x x^T (float64) over the vectors seen so far; one per group for a conv. The sum
    of x rides along: with it, a joint pair's augmented correlation needs no second pass."""

    gram: np.ndarray | None = None
    count: int = 0
    sums: np.ndarray | None = None  # (groups, K): sum of x

    def add(self, vectors: np.ndarray) -> None:
        stack = _as_stack(vectors)
        if self.gram is None:
            self.gram = np.zeros((stack.shape[0], stack.shape[2], stack.shape[2]))
            self.sums = np.zeros((stack.shape[0], stack.shape[2]))
        self.gram += np.matmul(stack.transpose(0, 2, 1), stack)
        self.sums += stack.sum(axis=1)
        self.count += stack.shape[1]

    def result(self) -> np.ndarray | None:
        """(K, K), or (groups, K, K) for a grouped conv."""
        if self.gram is None:
            return None
        return self.gram[0] if len(self.gram) == 1 else self.gram


# Block by block, an activation keeps its vectors (not a Gram) while they number at most this fraction of its width.
SAMPLE_FRACTION = 0.5


class SampleAccumulator:
    """Statistics of an activation when the model is calibrated block by block: the vectors themselves (n x K),
    appended to an unlinked temporary file in $TMPDIR, while n <= SAMPLE_FRACTION x K; past that, a running Gram
    as in GramAccumulator. A few samples of a wide model (an 8B model's 129 activations on 256 tokens) then cost
    disk, not memory: K x K float64 Grams would take 66 GB. `result()` is a lowrank.SampleGram over the
    memory-mapped file, or the Gram."""

    def __init__(self) -> None:
        self.file: Any = None
        self.width = 0
        self.dtype: np.dtype = np.dtype(np.float32)
        self.stored = 0  # vectors in the file
        self.stored_sums: np.ndarray | None = None
        self.gram: GramAccumulator | None = None  # once the vectors outnumber the limit
        self.mapped: np.memmap | None = None  # the vectors once collection is over (result())

    @property
    def count(self) -> int:
        return self.gram.count if self.gram is not None else self.stored

    @property
    def sums(self) -> np.ndarray | None:
        return self.gram.sums if self.gram is not None else self.stored_sums

    def add(self, vectors: np.ndarray) -> None:
        if self.mapped is not None:
            raise ValueError("the statistics were already taken (result())")
        if self.gram is not None:
            self.gram.add(vectors)
            return
        vectors = np.asarray(vectors)
        if self.file is None:
            self.width = vectors.shape[1]
            self.dtype = vectors.dtype if vectors.dtype.kind == "f" else np.dtype(np.float32)
            self.stored_sums = np.zeros((1, self.width))
            self.file = tempfile.TemporaryFile(prefix="onnxlr-statistics-")
        if self.stored + len(vectors) > SAMPLE_FRACTION * self.width:
            self._to_gram().add(vectors)
            return
        self.file.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self.stored_sums += vectors.sum(axis=0, dtype=np.float64)
        self.stored += len(vectors)

    def _stored(self) -> np.memmap:
        self.file.flush()
        return np.memmap(self.file, dtype=self.dtype, mode="r", shape=(self.stored, self.width))

    def _to_gram(self) -> GramAccumulator:
        """Replace the stored vectors by their Gram; returns it."""
        self.gram = GramAccumulator()
        if self.stored:
            stored = self._stored()
            for start in range(0, self.stored, 4096):
                self.gram.add(stored[start:start + 4096])
            del stored
        self.file.close()
        self.file = None
        return self.gram

    def result(self) -> Any:
        """A lowrank.SampleGram (the vectors, memory-mapped), or the (K, K) Gram past the limit. Collection is over
        once it is asked for: the file is mapped once and closed (the map keeps it, one descriptor per activation)."""
        if self.gram is not None:
            return self.gram.result()
        if not self.stored:
            return None
        if self.mapped is None:
            self.mapped = self._stored()
            self.file.close()
        return lowrank.SampleGram([self.mapped])


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
        gram = self.gram.result()
        assert gram is not None  # added with the cross
        return gram, (self.cross[0] if len(self.cross) == 1 else self.cross)


def _as_stack(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors[None] if vectors.ndim == 2 else vectors


def probes(model: ir.Model, inputs_as_constants: bool = False) -> list[Probe]:
    """The main-graph targets with a constant weight, and how their activations are read (the rules say).

    `inputs_as_constants` (--inputs-as-constants; always for IR < 4): initializers listed as graph
    inputs are weights, as the targets were found."""
    context = Context(shapes={}, opset=default_opset(model),
                      inputs_as_constants=inputs_are_weights(model, inputs_as_constants))
    found: list[Probe] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in RULES or not RULES[node.op_type].calibrated:
            continue  # not a target, or a rule that takes no statistics (LSTM/GRU/RNN: plain SVD)
        try:
            target = RULES[node.op_type]().match(node, context)
        except Skip:
            continue
        if not node.outputs[0].name:
            continue
        activation = target.rule.activation(target)
        if activation.layout == "patches":
            found.append(_patch_probe(node, activation, target.array, target.dtype, len(found)))
        elif activation.value.name:
            found.append(Probe(key=node.outputs[0].name, activation=activation.value.name, layout=activation.layout,
                               node=node.name or "", op=node.op_type))
    return found


def statistics_bytes(model: ir.Model, shapes: Mapping[str, tuple | None], wanted: Any = None,
                     batches: int | None = None) -> tuple[int, int]:
    """What the statistics of `model`'s probes take, for the memory check before calibration: (bytes held in memory
    while collecting, bytes of the largest whitening's working set). `wanted(probe)`: the probes the run will
    collect (--include/--exclude, --ops); sizes come from the inferred `shapes` (unknown ones count as 0).

    Whole model (`batches` None): one float64 K x K Gram per activation and group, and whitening one takes
    memory.WHITENING_COPIES more. Block by block (`batches`: how many batches of the shapes' size the data makes),
    an activation with at most SAMPLE_FRACTION x K vectors keeps them on disk (SampleAccumulator): nothing held,
    and whitening it takes about two float64 n x K copies."""
    from onnxlr.verification.memory import WHITENING_COPIES

    sizes: dict[tuple, tuple[int, int | None]] = {}  # (activation, layout, groups) -> (K, vectors)
    for probe in probes(model):
        if wanted is not None and not wanted(probe):
            continue
        if probe.unfold is not None:
            size, count = probe.unfold["channels"] // probe.groups * int(np.prod(probe.unfold["spatial"])), None
        else:
            dims = shapes.get(probe.activation) or ()
            axis = -1 if probe.layout == "rows" else -2
            size = dims[axis] if len(dims) >= -axis and isinstance(dims[axis], int) else 0
            known = size and all(isinstance(d, int) for d in dims)
            count = int(np.prod(dims)) // size * batches if known and batches is not None else None
        sizes[(probe.activation, probe.layout, probe.groups)] = (size, count)
    held = working = 0
    for (_, layout, groups), (size, count) in sizes.items():
        if count is not None and layout != "patches" and groups == 1 and count <= SAMPLE_FRACTION * size:
            working = max(working, 2 * count * size * 8)
        else:
            held += groups * size * size * 8
            working = max(working, WHITENING_COPIES * groups * size * size * 8)
    return held, working


def _patch_probe(node: ir.Node, activation: Activation, kernel: np.ndarray, dtype: ir.DataType, index: int) -> Probe:
    """A conv's patches: read by a one-hot depthwise conv with the node's own patch attributes."""
    cin, spatial = kernel.shape[1] * activation.groups, kernel.shape[2:]
    attrs = {"kernel_shape": list(spatial), "group": cin}
    assert activation.patches is not None  # a conv's activation carries its patch attributes
    attrs.update({name: value for name, value in activation.patches.items() if name != "kernel_shape"})
    key = node.outputs[0].name
    assert key is not None  # probes() leaves out nodes whose output has no name
    unfold = {"input": activation.value.name, "channels": cin, "spatial": tuple(spatial),
              "dtype": dtype.numpy(), "attributes": attrs}
    return Probe(key=key, activation=f"onnxlr_calibration_patches_{index}", layout="patches",
                 groups=activation.groups, unfold=unfold, node=node.name or "", op=node.op_type)


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


# ----------------------------------------------------------------------------- the probe model


@dataclasses.dataclass
class Slot:
    """A weight that calibration may replace by a feed: every node (by output name) that reads it."""

    keys: list[str]
    weight_inputs: list[int]  # per node: which input carries the weight
    array: np.ndarray  # the weight as the first node reads it (constant chains folded)
    # Per node: True when it reads the transpose of `array` (a tied head's Eᵀ beside the embedding's E).
    transposed: list[bool] = dataclasses.field(default_factory=list)
    owner: int | None = None  # id of the weight group it feeds (Runner.feed finds its index by it)


class Runner:
    """One onnxruntime session of the original model with every probe's activation as an extra output.

    With `slots`, each slot's weight is a graph input (its initializer the default), so `run` can
    feed a factorized weight in its place without rebuilding the session.

    With `segment_budget` (bytes of weights; a model that does not fit in memory whole) there is no session:
    `moments` runs the probe model block by block (onnxlr.verification.segments), and `run` (whole-model runs: sensitivity,
    pairs, compensation, target search) refuses.
    """

    def __init__(self, model_source: str | os.PathLike | bytes, model: ir.Model, found: list[Probe],
                 slots: Sequence[Slot] = (), segment_budget: int | None = None):
        self.specs = input_specs(model)
        self.model = model  # traces a node onnxruntime fails on back to the input at fault
        self.outputs = cast("list[str]", [value.name for value in model.graph.outputs])  # ONNX names them all
        self.probes = {probe.key: probe for probe in found}
        self.slots = list(slots)  # feed index -> Slot
        self._feeds = {slot.owner: index for index, slot in enumerate(self.slots) if slot.owner is not None}
        self.segment_budget = segment_budget
        if segment_budget is not None and isinstance(model_source, bytes):
            raise OnnxlrError("calibrating in segments needs the model's path (its weights are read there)")
        # In segments nothing is fed: the slots' weights stay initializers.
        proto_bytes, folder, self.slot_inputs = _probe_model(model_source, found,
                                                             list(slots) if segment_budget is None else [])
        self.source, self.probe_model = model_source, proto_bytes
        self.session = None if segment_budget is not None else make_session(proto_bytes, "cpu",
                                                                            external_data_folder=folder)
        mask = self.specs.get(MASK_INPUT_NAME)
        self.mask_input = MASK_INPUT_NAME if mask is not None and len(mask.shape) == 2 else None
        self.masked = masked_probes(model, found) if self.mask_input else frozenset()  # probe keys

    def feed(self, owner: object) -> int | None:
        """The feed index of a weight group's weight (None when it has none: not calibrated)."""
        return self._feeds.get(id(owner))

    def run(self, batch: Mapping[str, np.ndarray], names: Iterable[str],
            overrides: Mapping[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Fetch `names` for one batch; `overrides` maps slot index -> the weight to use instead."""
        feeds = dict(batch)
        for index, array in (overrides or {}).items():
            feeds[self.slot_inputs[index]] = array
        names = list(dict.fromkeys(names))
        if self.session is None:
            raise OnnxlrError("this step runs the whole model, which does not fit in memory (calibration runs it in "
                              "segments): leave out --param-budget, --target-cosine/--target-error, --compensate and "
                              "--quantize int8-static")
        try:
            return dict(zip(names, self.session.run(names, feeds)))
        except Exception as exc:  # onnxruntime's own exception types: bad shapes or values
            raise input_error(exc, batch, "calibration data does not run through the model", CALIBRATION_HINT,
                              self.model) from exc

    def keep(self, batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The non-padding [batch, seq] positions, when the model has an attention mask input."""
        return batch[self.mask_input] != 0 if self.mask_input else None

    def vectors(self, key: str, outputs: Mapping[str, np.ndarray], keep: np.ndarray | None) -> np.ndarray:
        """The probe's vectors; `keep` (from `keep`) applies only to the probes the mask indexes."""
        probe = self.probes[key]
        return vectors(outputs[probe.activation], probe.layout, probe.groups, keep if key in self.masked else None)


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
    assert spec is not None  # a patches probe
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
    names = {nodes[key].input[where] for key, where in zip(slot.keys, slot.weight_inputs)}
    initializers = {init.name: init for init in graph.initializer}
    if len(names) == 1 and (name := names.pop()) in initializers and not any(slot.transposed):
        init = initializers[name]  # the nodes read an initializer: declaring it an input makes it feedable
    else:  # a folded constant chain: a new initializer holding its value, read by the nodes instead
        name = f"onnxlr_calibration_weight_{index}"
        init = onnx.numpy_helper.from_array(np.ascontiguousarray(slot.array), name)
        graph.initializer.append(init)
        if any(slot.transposed):  # the readers of the transpose read it through a Transpose of the feed
            graph.node.insert(0, onnx.helper.make_node("Transpose", [name], [f"{name}_T"], perm=[1, 0]))
        for key, where, flipped in zip(slot.keys, slot.weight_inputs, slot.transposed or [False] * len(slot.keys)):
            nodes[key].input[where] = f"{name}_T" if flipped else name
    if name not in {value.name for value in graph.input}:
        graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    return name


# ----------------------------------------------------------------------------- collection


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
    # moments keeps only the accumulators that saw vectors; a whole-model runner's are Grams.
    return {key: cast(np.ndarray, acc.result()) for key, acc in moments(runner, batches, keys, overrides).items()}


def moments(runner: Runner, batches: Iterable[Mapping[str, np.ndarray]], keys: Iterable[str] | None = None,
            overrides: Mapping[int, np.ndarray] | None = None) -> dict[str, GramAccumulator | SampleAccumulator]:
    """The accumulated statistics (Gram, sum, count) of the probes `keys` that saw any vector.

    Probes that read the same activation the same way (q, k and v of one attention) share one accumulator: the
    same object under each key, never modified after."""
    keys = list(runner.probes if keys is None else keys)
    shares: dict[tuple, list[str]] = {}
    for key in keys:
        probe = runner.probes[key]
        shares.setdefault((probe.activation, probe.layout, probe.groups, key in runner.masked), []).append(key)
    # Block by block, activations of one vector stack (not a grouped conv's patches) may keep their vectors.
    sums = {share: SampleAccumulator() if runner.session is None and share[1] != "patches" and share[2] == 1
            else GramAccumulator() for share in shares}

    def add(batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        keep = runner.keep(batch)
        for share, members in shares.items():
            if share[0] in outputs:
                sums[share].add(runner.vectors(members[0], outputs, keep))

    names = list(dict.fromkeys(share[0] for share in shares))
    if runner.session is None:  # block by block: each activation is reduced as soon as its segment makes it
        from onnxlr.verification.segments import run_in_segments

        if overrides:
            raise OnnxlrError("statistics of a partly factorized model need the whole model in memory")
        batches = list(batches)
        # A runner without a session was made for segments, from the model's path (Runner refuses bytes).
        assert runner.segment_budget is not None and not isinstance(runner.source, bytes)
        run_in_segments(runner.source, batches, [], runner.segment_budget,
                        structure=onnx.load_from_string(runner.probe_model), observe=names,
                        on_value=lambda index, name, array: add(batches[index], {name: array}))
    else:
        for batch in batches:
            add(batch, runner.run(batch, names, overrides))
    return {key: sums[share] for share, members in shares.items() for key in members if sums[share].count}


def compensation_statistics(runner: CalibrationRunner, batches: Iterable[Mapping[str, np.ndarray]], keys: Iterable[str],
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
    return {key: result for key, acc in sums.items() if (result := acc.result()) is not None}


def model_outputs(runner: CalibrationRunner, batches: Iterable[Mapping[str, np.ndarray]],
                  overrides: Mapping[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The model's own outputs over all batches (concatenated along the first axis), padded positions of per-token
    outputs zeroed (onnxlr.verification.task_metrics.without_padding: what every comparison of outputs measures)."""
    from onnxlr.verification.task_metrics import attention_mask, joined_rows, without_padding

    parts: dict[str, list[np.ndarray]] = {name: [] for name in runner.outputs}
    masks: list[np.ndarray | None] = []
    for batch in batches:
        for name, value in runner.run(batch, runner.outputs, overrides).items():
            parts[name].append(np.asarray(value))
        masks.append(attention_mask(batch))
    return without_padding({name: (np.concatenate(v) if v[0].ndim and len(v) > 1 else v[0])
                            for name, v in parts.items()}, joined_rows(masks))
