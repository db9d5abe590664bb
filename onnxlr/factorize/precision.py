"""`--quantize auto`: one plan over precision x correction rank, priced by the bytes written and the error of what is
written.

Each MatMul weight can be written as it is (float), 8-bit (symmetric) or 4-bit (symmetric, or asymmetric with a zero
point per block) with onnxruntime's MatMulNBits (RTN) and `--quantize-block` B, 2B or 4B weights per scale, or 4-bit with a low-rank correction of its error at rank r (int8 or
float16 factors, onnxlr.factorize.correction); each embedding table float or 4-bit (GatherBlockQuantized, the same
blocks). An option's price
is the bytes its tensors take, read off the quantized node onnxruntime wrote (and the factors' sizes). Its error is the
model's: the squared relative output error (datafit.relative_error, additive over small independent errors) with that
one layer written that way, measured on the first calibration samples for the plain 4-bit and 8-bit weights (read
back from the quantized node, correction.dequantized), and for a corrected weight the 4-bit one's scaled by how much
of the whitened error ||X·(W - Q(W) - A·B)|| the factors leave (A and B as they are stored).

Each layer's options on their lower convex hull (bytes up, error down) give one path of upgrades, the best error
saved per byte first (`upgrade_path`): from every layer at its fewest bytes to every layer float. `--size-budget P`
takes the last point within P of the input's weight bytes; `--target-cosine` / `--target-error` the first point whose
written model meets the goal on the held-out samples (bisection; each step writes the model and measures it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import onnx_ir as ir

from onnxlr.calibrate import datafit
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import correction, cost, lowrank, quantize
from onnxlr.passes import NameGenerator
from onnxlr.settings import Progress, no_progress
from onnxlr.verification.task_metrics import token_inputs

logger = logging.getLogger(__name__)

CORRECTION_RANKS = (4, 8, 16, 32, 64)  # the corrections each 4-bit MatMul may get
BLOCK_STEPS = (1, 2, 4)  # the blocks planned: --quantize-block times these (fewer scales, more error)
CORRECTION_DTYPES = ("int8", "float16")
FLOAT, EIGHT, FOUR = 32, 8, 4


Config = tuple[int, int, bool]  # how onnxruntime's quantizer writes a weight: bits, block, symmetric


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to write a layer: its bits (32: float, as it is) and weights per scale, correction rank and factor
    type (4-bit only), the bytes its tensors take and the squared relative output error it adds (measured or
    predicted)."""

    bits: int
    bytes: int
    loss: float
    rank: int = 0
    dtype: str = ""
    block: int = 0
    symmetric: bool = True

    @property
    def label(self) -> str:
        if self.bits == FLOAT:
            return "float"
        return (f"{self.bits}-bit/{self.block}" + ("" if self.symmetric else " asym")
                + (f" + rank {self.rank} {self.dtype}" if self.rank else ""))

    @property
    def config(self) -> Config:
        return self.bits, self.block, self.symmetric


@dataclasses.dataclass(frozen=True)
class Layer:
    """A MatMul weight or an embedding table the plan writes: its node (by name and output), its options on their
    lower convex hull (fewest bytes first) and, for a MatMul, the whitened SVD of its 4-bit error by block (the
    corrections' factors)."""

    key: str  # the node's output name
    node: str  # the node's name (onnxruntime's quantizer includes and excludes nodes by it)
    table: bool
    options: tuple[Option, ...]
    error_svds: Mapping[Config, lowrank.Decomposition] = dataclasses.field(default_factory=dict)


Choice = tuple[int, ...]  # an option index per layer


@dataclasses.dataclass(frozen=True)
class Step:
    """A point of the upgrade path: each layer's option, the bytes of all planned layers and the predicted loss."""

    choice: Choice
    bytes: int
    loss: float


def lower_hull(options: Sequence[Option]) -> tuple[Option, ...]:
    """The options no mix of two others beats: fewest bytes first, each further one cheaper per unit of error saved
    than the one after it."""
    ordered = sorted(options, key=lambda o: (o.bytes, o.loss))
    frontier: list[Option] = []
    for option in ordered:
        if frontier and option.loss >= frontier[-1].loss:
            continue  # more bytes, no less error
        while len(frontier) >= 2 and _slope(frontier[-2], frontier[-1]) <= _slope(frontier[-1], option):
            frontier.pop()  # the middle point saves less per byte than going straight on
        frontier.append(option)
    return tuple(frontier)


def _slope(cheaper: Option, dearer: Option) -> float:
    """Error saved per byte going from `cheaper` to `dearer`."""
    return (cheaper.loss - dearer.loss) / max(dearer.bytes - cheaper.bytes, 1)


def upgrade_path(layers: Sequence[Layer]) -> list[Step]:
    """From every layer at its cheapest option to every layer at its last: one upgrade a step, the most error saved
    per byte first (each layer's hull makes its own upgrades come in order)."""
    choice = [0] * len(layers)
    total = sum(layer.options[0].bytes for layer in layers)
    loss = sum(layer.options[0].loss for layer in layers)
    steps = [Step(tuple(choice), total, loss)]
    heap = [(-_slope(layer.options[0], layer.options[1]), index)
            for index, layer in enumerate(layers) if len(layer.options) > 1]
    heapq.heapify(heap)
    while heap:
        _, index = heapq.heappop(heap)
        options, at = layers[index].options, choice[index]
        total += options[at + 1].bytes - options[at].bytes
        loss += options[at + 1].loss - options[at].loss
        choice[index] = at + 1
        steps.append(Step(tuple(choice), total, max(loss, 0.0)))
        if at + 2 < len(options):
            heapq.heappush(heap, (-_slope(options[at + 1], options[at + 2]), index))
    return steps


# ----------------------------------------------------------------------------- pricing each layer's options


def plan_layers(model: ir.Model, source: Path, data: datafit.CalibrationData, block: int,
                progress: Progress = no_progress) -> list[Layer]:
    """Every MatMul with a constant 2-D weight and every embedding table of `model` (written at `source` by
    quantize.saved, its nodes named), with its options priced. One quantized copy of the model is read at a time."""
    weights, tables = _planned_weights(model)
    if not weights and not tables:
        raise OnnxlrError("{0} auto plans MatMul weights and embedding tables (onnxruntime's MatMulNBits and "
                          "GatherBlockQuantized): this model has none; use {0} int8 or int8-static", "quantize")
    names = {cast(str, node.outputs[0].name): node.name or "" for node in model.graph}
    grams, output_error = quantize.layer_measures(model, source, data, weights, tables)
    assert output_error is not None  # measured (the default)
    options = {key: [Option(FLOAT, array.nbytes, 0.0)] for key, array in {**weights, **tables}.items()}
    svds: dict[str, dict[Config, lowrank.Decomposition]] = {key: {} for key in weights}
    blocks = planned_blocks(block)
    configs = [(EIGHT, size, True) for size in blocks] + [(FOUR, size, sym) for size in blocks for sym in (True, False)]
    for config in progress(configs, "pricing each layer's precisions"):
        for key, stored, nbytes in _stored(source, config, tables=bool(tables) and config[0] == FOUR):
            if key not in options:
                continue
            plain = Option(config[0], nbytes, output_error(key, stored), block=config[1], symmetric=config[2])
            options[key].append(plain)
            if config[0] == FOUR and key in grams:
                svds[key][config] = _corrections(weights[key], grams[key], stored, plain, options[key])
    layers = []
    for key, priced in options.items():
        kept = [option for option in priced if option.bytes <= priced[0].bytes]  # never more than the float weight
        if len(kept) > 1:
            layers.append(Layer(key, names[key], key in tables, lower_hull(kept), svds.get(key, {})))
    return layers


def planned_blocks(block: int) -> tuple[int, ...]:
    """The weights per scale the plan tries: `block` and its multiples (BLOCK_STEPS) up to 256."""
    return tuple(block * step for step in BLOCK_STEPS if block * step <= 256)


def _corrections(weight: np.ndarray, gram: np.ndarray, stored: np.ndarray, plain: Option, options: list[Option]
                 ) -> lowrank.Decomposition:
    """Appends to `options` the 4-bit weight (`plain`, as `stored`) with each correction of its error (rank, factor
    type), priced: the plain loss scaled by the whitened error the stored factors leave. Returns the error's whitened
    SVD."""
    error = weight.astype(np.float64) - stored
    whitened = _whitened_energy(error, gram)
    decomposition = lowrank.whitened_svd(error[None], gram, side="rows",
                                         rank=min(max(CORRECTION_RANKS), *error.shape))
    for rank in CORRECTION_RANKS:
        if rank > decomposition.full_rank:
            break
        a, b = decomposition.factors(rank)
        for dtype in CORRECTION_DTYPES:
            stored_a, stored_b = correction.as_stored(a[0], dtype), correction.as_stored(b[0], dtype)
            added = correction.factor_bytes(a[0].shape, dtype) + correction.factor_bytes(b[0].shape, dtype)
            left = _whitened_energy(error - stored_a @ stored_b, gram)
            options.append(dataclasses.replace(plain, bytes=plain.bytes + added, rank=rank, dtype=dtype,
                                              loss=plain.loss * left / max(whitened, 1e-30)))
    return decomposition


def _whitened_energy(error: np.ndarray, gram: np.ndarray) -> float:
    """||X·E||² on the calibration activations: trace(Eᵀ G E)."""
    return float(np.sum((gram @ error) * error))


def _planned_weights(model: ir.Model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """By node output name: the constant 2-D float weights MatMuls read on the right, and the embedding tables
    (a Gather's constant 2-D float data on axis 0, read by nothing else: a tied head stays float)."""
    weights, tables = {}, {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.outputs[0].name is None or len(node.inputs) < 2:
            continue
        first, second = node.inputs[0], node.inputs[1]
        if node.op_type == "MatMul" and second is not None:
            tensor = ir.convenience.get_const_tensor(second)
            if (tensor is not None and len(tensor.shape) == 2 and tensor.dtype == ir.DataType.FLOAT
                    and _only_reader(second) and (first is None or ir.convenience.get_const_tensor(first) is None)):
                weights[node.outputs[0].name] = tensor.numpy()
        elif node.op_type == "Gather" and first is not None and node.attributes.get_int("axis", 0) == 0:
            tensor = ir.convenience.get_const_tensor(first)
            if tensor is not None and len(tensor.shape) == 2 and tensor.dtype == ir.DataType.FLOAT and _only_reader(first):
                tables[node.outputs[0].name] = tensor.numpy()
    return weights, tables


def _only_reader(weight: ir.Value) -> bool:
    """A weight read by one node and not exposed (a graph input can be overridden, an output is read as it is)."""
    return len(weight.uses()) == 1 and not weight.is_graph_input() and not weight.is_graph_output()


def _stored(source: Path, config: Config, tables: bool) -> Iterator[tuple[str, np.ndarray, int]]:
    """Every weight of the model at `source` as onnxruntime stores it with `config` (its tables too, at 4 bits, with
    `tables`): its node's output name, the weight read back and the bytes of the node's constant inputs."""
    target = source.with_name("stored-{}-{}-{}.onnx".format(*config))
    _quantize_nodes(source, target, {config: None}, tables)
    quantized = ir.load(target)
    ir.external_data.load_to_model(quantized)
    for node in quantized.graph:
        if node.domain == "com.microsoft" and node.op_type in correction.STORED_OPS:
            constants = [ir.convenience.get_const_tensor(v) for v in node.inputs if v is not None]
            nbytes = sum(tensor.nbytes for tensor in constants if tensor is not None)
            yield cast(str, node.outputs[0].name), correction.dequantized(node).astype(np.float32), nbytes


# ----------------------------------------------------------------------------- writing a plan


def write(source: Path, layers: Sequence[Layer], choice: Choice) -> ir.Model:
    """The model at `source` with each planned layer written as `choice` says (the other weights as they are)."""
    chosen = {layer.node: layer.options[at] for layer, at in zip(layers, choice)}
    by_config: dict[Config, set[str]] = {}
    for node, option in chosen.items():
        if option.bits != FLOAT:
            by_config.setdefault(option.config, set()).add(node)
    tables = any(layer.table and chosen[layer.node].bits == FOUR for layer in layers)
    target = source.with_name("planned.onnx")
    _quantize_nodes(source, target, dict(sorted(by_config.items(), reverse=True)), tables)
    model = ir.load(target)
    ir.external_data.load_to_model(model)
    by_output = {cast(str, node.outputs[0].name): node for node in model.graph}
    names = NameGenerator(model)
    for layer, at in zip(layers, choice):
        option = layer.options[at]
        if option.rank:
            a, b = layer.error_svds[option.config].factors(option.rank)
            correction.add_correction(model.graph, by_output[layer.key], a[0], b[0],
                                      correction.FACTOR_DTYPES[option.dtype], names)
    model.graph.sort()
    return model


def _quantize_nodes(source: Path, target: Path, nodes_by_config: Mapping[Config, set[str] | None],
                    tables: bool) -> None:
    """onnxruntime's MatMulNBits quantizer, once per config over the nodes named for it (None: every MatMul),
    and with `tables` the 4-bit passes over the planned tables too (the model at opset 21 first)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(source)
    if tables:  # int4 tables need opset 21; a model the converter cannot take keeps them float (it says why)
        converted = quantize.at_opset_21(proto)
        tables, proto = converted is not None, converted or proto
    everything = {node.name for node in proto.graph.node}
    for (bits, block, symmetric), nodes in nodes_by_config.items():
        ops = ("MatMul", "Gather") if tables and bits == FOUR else ("MatMul",)
        planned = everything if nodes is None else nodes
        excluded = [name for name in everything if name not in planned]
        with quantize.quiet_quantizer():
            quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block, is_symmetric=symmetric,
                                             op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)),
                                             nodes_to_exclude=excluded)
            quantizer.process()
        proto = quantizer.model.model
    onnx.save(proto, target, save_as_external_data=True, location=target.name + ".data")


@contextlib.contextmanager
def named_copy(model: ir.Model) -> Iterator[Path]:
    """quantize.saved, with every node of the main graph named uniquely first (the quantizer picks nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"onnxlr_node_{index}"
        seen.add(node.name)
    with quantize.saved(model) as source:
        yield source


# ----------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class Search:
    """What the stage chose: the path step, the written model and its measures."""

    step: int
    model: ir.Model
    measured: float | None  # the goal's metric on the held-out samples (None for a size budget)
    written: int  # steps written and measured


def auto_stage(model: ir.Model, data: datafit.CalibrationData, block: int, goal: datafit.Goal | None,
               size_budget: float | None, progress: Progress = no_progress) -> tuple[ir.Model, dict]:
    """`--quantize auto`: the plan and the model it writes, and what the report says of it."""
    bytes_before = cost.model_totals(model)["bytes"]
    if goal is not None and not data.heldout:
        raise OnnxlrError("{0} auto with a target needs held-out samples to measure on: give {1} (e.g. FILE.npz)",
                          "quantize", "heldout")
    with named_copy(model) as source:
        layers = plan_layers(model, source, data, block, progress)
        steps = upgrade_path(layers)
        fixed = bytes_before - sum(layer.options[-1].bytes for layer in layers if layer.options[-1].bits == FLOAT)
        logger.info("--quantize auto: %d layers, %d plans from %d to %d bytes", len(layers), len(steps),
                    fixed + steps[0].bytes, fixed + steps[-1].bytes)
        if goal is not None:
            search = _search_goal(source, layers, steps, data, goal)
        else:
            assert size_budget is not None
            search = _within_budget(source, layers, steps, fixed, size_budget * bytes_before)
    chosen = steps[search.step]
    counts: dict[str, int] = {}
    for layer, at in zip(layers, chosen.choice):
        label = ("table " if layer.table else "") + layer.options[at].label
        counts[label] = counts.get(label, 0) + 1
    stage = {"mode": "auto", "blocks": list(planned_blocks(block)), "layers": len(layers), "plans": len(steps),
             "plan": dict(sorted(counts.items())), "steps_written": search.written,
             "predicted_loss": round(chosen.loss, 8),
             "bytes_after": cost.model_totals(search.model)["bytes"],
             "corrections": [{"layer": layer.key, "rank": layer.options[at].rank, "dtype": layer.options[at].dtype}
                             for layer, at in zip(layers, chosen.choice) if layer.options[at].rank]}
    if goal is not None:
        stage["final"] = {goal.metric: search.measured, "goal": goal.value, "met": goal.met(cast(float, search.measured))}
    else:
        stage["size_budget"] = size_budget
    return search.model, stage


def _within_budget(source: Path, layers: Sequence[Layer], steps: Sequence[Step], fixed: int,
                   budget: float) -> Search:
    """The last step whose weights fit `budget` bytes (the cheapest one if none does: it says so)."""
    fitting = [index for index, step in enumerate(steps) if fixed + step.bytes <= budget]
    if not fitting:
        raise OnnxlrError(f"no plan fits {{0}}: the smallest takes {fixed + steps[0].bytes} bytes of weights, "
                          f"the budget is {int(budget)}", "size_budget")
    return Search(fitting[-1], write(source, layers, steps[fitting[-1]].choice), None, 1)


def _search_goal(source: Path, layers: Sequence[Layer], steps: Sequence[Step], data: datafit.CalibrationData, goal: datafit.Goal) -> Search:
    """The first step whose written model meets `goal` on the held-out samples: bisection over the path (the
    measure grows along it), starting where the predicted loss meets it."""
    heldout = cast(list, data.heldout)
    reference = quantize.outputs(data.source, heldout)
    written: dict[int, tuple[ir.Model, float]] = {}

    def measure(index: int) -> float:
        if index not in written:
            model = write(source, layers, steps[index].choice)
            written[index] = (model, goal.measure(reference, quantize.outputs(model, heldout), token_inputs(heldout)))
            logger.info("plan %d/%d: %d bytes, held-out %s %.4f", index, len(steps) - 1, steps[index].bytes,
                        goal.metric, written[index][1])
        return written[index][1]

    low, high = 0, len(steps) - 1
    if not goal.met(measure(high)):
        raise OnnxlrError(f"{{0}} auto cannot meet {goal}: with every planned layer float the held-out "
                          f"{goal.metric} is {written[high][1]:.4f}", "quantize")
    while low < high:
        middle = (low + high) // 2
        if goal.met(measure(middle)):
            high = middle
        else:
            low = middle + 1
    return Search(high, written[high][0], written[high][1], len(written))
