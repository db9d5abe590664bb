"""`--quantize`: onnxruntime's quantizers after the rewrite, so low rank and quantization compose.

Modes (onnxruntime's own tools; nothing here quantizes a tensor by hand):
- `int8`: dynamic quantization, per-channel signed INT8 weights with reduce_range (`quantize_dynamic`),
  the one-line alternative every onnxlr figure is read against, now applied to the factorized model;
- `int8-static`: static QDQ quantization (`quantize_static`, per-channel INT8 weights, UINT8
  activations) calibrated on the `--calibration` data;
- `fp16`: float16 weights and compute with float32 inputs and outputs (onnxruntime's
  `transformers.float16` converter, `keep_io_types`);
- `int4`: 4-bit weight-only MatMuls (`MatMulNBitsQuantizer`: MatMulNBits, RTN, block 32, symmetric unless
  `--quantize-asymmetric`) and
  4-bit embedding tables (GatherBlockQuantized, for which the model is converted to opset 21 first; a model
  the converter cannot take keeps its tables). With `--correction-rank R` and calibration data each
  4-bit MatMul gets a rank-R correction of its quantization error (onnxlr.factorize.correction).

onnxruntime's quantizer wants weights as initializers: Constant-node weights (Paddle, some
TensorFlow exports) are lifted first (onnx-ir's LiftConstantsToInitializersPass). The model goes
through a temporary folder (external data included, so models over 2 GB work) and comes back with
its tensors in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxlr.calibrate import datafit
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import cost
from onnxlr.settings import QUANTIZE_MODES as MODES
from onnxlr.settings import Settings
from onnxlr.verification.runtime import make_session
from onnxlr.verification.task_metrics import attention_mask, joined_rows, token_inputs, without_padding

logger = logging.getLogger(__name__)


def quantize(model: ir.Model, mode: str, calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
             block: int = 32, symmetric: bool = True) -> ir.Model:
    """The quantized model; `model` itself only gets its Constant-node tensors lifted to initializers.
    `calibration` batches are needed for int8-static; `block`: int4's weights per scale, `symmetric`: without zero
    points."""
    with saved(model) as source:
        return quantize_saved(source, mode, calibration, block, symmetric)


@contextlib.contextmanager
def saved(model: ir.Model) -> Iterator[Path]:
    """`model` written to a temporary folder (external data beside it) for onnxruntime's tools to read, its
    Constant-node tensors lifted to initializers first (in place: the quantizer reads weights only there)."""
    with tempfile.TemporaryDirectory(prefix="onnxlr-quantize-") as folder:
        source = Path(folder) / "model.onnx"
        lift_constants(model)
        ir.save(model, source, external_data="model.onnx.data")
        yield source


def quantize_saved(source: Path, mode: str, calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
                   block: int = 32, symmetric: bool = True) -> ir.Model:
    """The model `saved` wrote at `source`, quantized (quantize's arguments), with its tensors in memory."""
    if mode not in MODES or mode == "auto":  # auto is a plan over several quantizers (onnxlr.factorize.precision)
        raise OnnxlrError(f"{{0}} must be one of {', '.join(m for m in MODES if m != 'auto')}, got {mode!r}",
                          "quantize")
    if mode == "int8-static" and not calibration:
        raise OnnxlrError("{0} int8-static needs calibration data ({1})", "quantize", "calibration")
    target = source.with_name("quantized.onnx")
    logger.info("quantizing (%s) with onnxruntime", mode)
    with quiet_quantizer():
        _run_quantizer(mode, source, target, calibration, block, symmetric)
    result = ir.load(target)
    ir.external_data.load_to_model(result)  # the folder goes away: the tensors come into memory
    result.graph.sort()  # the fp16 converter appends its input Casts after their readers
    return result


def lift_constants(model: ir.Model) -> None:
    """Constant-node tensors become initializers, in place (the quantizer reads weights only there)."""
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


def _run_quantizer(mode: str, source: Path, target: Path, calibration, block: int = 32,
                   symmetric: bool = True) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    large = source.with_suffix(".onnx.data").exists()
    # reduce_range (7-bit weights): x86 CPUs without VNNI multiply uint8 activations by int8 weights in
    # 16-bit pairs that saturate. The factor pairs' weights hit that far more than the original's: MiniLM
    # at --param-budget 0.8 kept a cosine of 0.397 after per-channel INT8 without it, 0.954 with it (0.962
    # before quantizing; the original loses 0.0004 to it).
    if mode == "int8":
        quantize_dynamic(source, target, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                         use_external_data_format=large)
    elif mode == "int8-static":
        weighted = static_nodes(source)
        quantize_static(source, target, _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=large, nodes_to_quantize=weighted,
                        op_types_to_quantize=list(WEIGHTED_OPS) if weighted is not None else None)
    elif mode == "int4":
        _int4(source, target, large, block, symmetric)
    else:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(onnx.load(source), keep_io_types=True)
        onnx.save(proto, target, save_as_external_data=large)


# Ops whose inputs static INT8 ruins: a normalization divides by a statistic of the whole vector, a softmax
# exponentiates; their activations (and the attention products between them) have outliers that one uint8 scale per
# tensor cannot hold. MiniLM with every op in QDQ kept a cosine of 0.354; with only its weighted MatMuls, 0.930.
NORMALIZING_OPS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                             "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization", "Softmax"})
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


def static_nodes(source: Path) -> list[str] | None:
    """int8-static on a model with normalization or softmax ops (a transformer; also a LayerNorm written out as
    ReduceMean and Sqrt): the names of the nodes to quantize, only the MatMul, Gemm and Conv nodes with a constant
    weight (unnamed ones are named in the file at `source` first). None for any other model: every op onnxruntime
    quantizes (a CNN's Relu and pooling stay in INT8 between its convs)."""
    import onnx

    proto = onnx.load(source, load_external_data=False)
    ops = {node.op_type for node in proto.graph.node}
    if not ops & NORMALIZING_OPS and not {"ReduceMean", "Sqrt"} <= ops:
        return None
    unnamed = [node for node in proto.graph.node if not node.name]
    for index, node in enumerate(unnamed):
        node.name = f"onnxlr_static_{index}"
    if unnamed:
        onnx.save(proto, source)  # the external data stays beside it, where the tensors still point
    constants = {init.name for init in proto.graph.initializer}
    constants |= {node.output[0] for node in proto.graph.node if node.op_type == "Constant"}
    weighted = [node.name for node in proto.graph.node
                if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in constants]
    logger.info("int8-static: %d weighted nodes quantized; normalization, softmax and the products between "
                "activations stay float", len(weighted))
    return weighted


def _int4(source: Path, target: Path, large: bool, block: int, symmetric: bool = True) -> None:
    """MatMulNBits for every MatMul with a constant right weight; GatherBlockQuantized for embedding tables,
    which needs opset 21 (int4 tensors): the model is converted first, and keeps its tables if it cannot be."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(source)
    ops: tuple[str, ...] = ("MatMul",)
    if any(node.op_type == "Gather" for node in proto.graph.node):
        converted = at_opset_21(proto)
        if converted is not None:
            proto, ops = converted, ("MatMul", "Gather")
    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=block, is_symmetric=symmetric,
                                     op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), large)


def at_opset_21(proto):
    """The model converted to opset 21 by onnx's version converter, or None (it says why in the log)."""
    from onnx import version_converter

    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    if version >= 21:
        return proto
    try:
        return version_converter.convert_version(proto, 21)
    except Exception as exc:  # the converter's own errors: an op it cannot carry over
        logger.warning("the model cannot be converted to opset 21 (%s): its embedding tables stay float", exc)
        return None


class _AdviceFilter(logging.Filter):
    """onnxruntime's quantizer logs advice to the root logger on every call ("consider pre-processing")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    root, advice = logging.getLogger(), _AdviceFilter()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our calibration batches (one batch per call)."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.batches = list(batches)
        self.iterator: Iterator[Mapping[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.iterator, None)
        return None if batch is None else dict(batch)

    def rewind(self) -> None:
        self.iterator = iter(self.batches)


# ----------------------------------------------------------------------------- the pipeline's stage


def quantize_stage(model: ir.Model, settings: Settings, data: datafit.CalibrationData | None,
                   goal: datafit.Goal | None, low_rank_bytes: int) -> tuple[ir.Model, dict]:
    """The quantized model (`settings.quantize`, its int4 block and the low-rank correction of 4-bit error) and what
    the report says of the stage: the weight bytes before (the rewrite's total, `low_rank_bytes`) and after, the
    correction's, and with a --target-* goal, the final model's measure on the held-out samples (the search aimed
    for it)."""
    mode, correction_rank = cast(str, settings.quantize), settings.correction_rank
    stage: dict = {"mode": mode, "bytes_low_rank": low_rank_bytes}
    if mode == "int4":
        stage["block"] = settings.quantize_block
        if not settings.quantize_symmetric:
            stage["symmetric"] = False
    with saved(model) as source:  # one copy on disk: the correction's calibration runs and the quantizer read it
        by_measure = settings.correction_allocation == "measured"
        weights, grams, output_error = (_correction_inputs(model, source, data, by_measure)
                                        if correction_rank and data is not None else ({}, {}, None))
        result = quantize_saved(source, mode, data.batches if data is not None else None, settings.quantize_block,
                                settings.quantize_symmetric)
        if correction_rank:
            from onnxlr.factorize import correction

            corrected = correction.correct(result, weights, grams, correction_rank, settings.correction_dtype,
                                           output_error)
    if correction_rank:
        stage["correction"] = {"rank": correction_rank, "dtype": settings.correction_dtype,
                               "allocation": settings.correction_allocation, "layers": len(corrected),
                               "ranks": [c.rank for c in corrected],
                               "bytes": sum(c.bytes_added for c in corrected),
                               "error_removed": [c.error_removed for c in corrected]}
    stage["bytes_after"] = cost.model_totals(result)["bytes"]
    if goal is not None and data is not None and data.heldout:
        measured = goal.measure(outputs(data.source, data.heldout), outputs(result, data.heldout),
                                token_inputs(data.heldout))
        stage["final"] = {goal.metric: measured, "goal": goal.value, "met": goal.met(measured)}
        if not goal.met(measured):
            logger.warning("after --quantize %s the held-out %s is %.4f, short of %s: errors did not add up as "
                           "the search assumed; try a stricter target", mode, goal.metric, measured, goal)
    return result, stage


def _correction_inputs(model: ir.Model, source: Path, data: datafit.CalibrationData, measured: bool
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Callable[[str, np.ndarray], float] | None]:
    """What a correction is fitted on, by MatMul output name: the float weight (a constant right input) and the
    Gram of the MatMul's input on the calibration batches, taken on the model as it is before quantizing (onnxruntime
    runs it from `source`, where `saved` wrote it); with
    `measured`, how far the model's outputs move with one layer's weight replaced (its quantized weight), on the
    first calibration samples (a weight read by several nodes is not measured: the ranks stay uniform then)."""
    from onnxlr.calibrate import calibration

    weights = {}
    readers: dict[int, int] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.outputs[0].name is None:
            continue
        tensor = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        left = ir.convenience.get_const_tensor(node.inputs[0]) if node.inputs[0] is not None else None
        if tensor is not None and left is None and len(tensor.shape) == 2:
            weights[node.outputs[0].name] = tensor.numpy()
            readers[id(node.inputs[1])] = readers.get(id(node.inputs[1]), 0) + 1
    if not any(p.key in weights for p in calibration.probes(model)):
        return weights, {}, None
    if measured and any(count > 1 for count in readers.values()):
        logger.warning("a MatMul weight is shared: correction ranks are uniform, not shared out by measurement")
        measured = False
    grams, output_error = layer_measures(model, source, data, weights, measured=measured)
    return weights, grams, output_error


def layer_measures(model: ir.Model, source: Path, data: datafit.CalibrationData, weights: Mapping[str, np.ndarray],
                   tables: Mapping[str, np.ndarray] | None = None, measured: bool = True
                   ) -> tuple[dict[str, np.ndarray], Callable[[str, np.ndarray], float] | None]:
    """On the model onnxruntime runs from `source`: the Gram of the input of each MatMul `weights` names (by output
    name) on the calibration batches, and with `measured` output_error(key, array): the model's squared relative
    output error (datafit.relative_error) on the first calibration samples with that MatMul's weight (or the
    embedding table `tables` names by its Gather's output) replaced by `array`."""
    from onnxlr.calibrate import calibration

    found = [p for p in calibration.probes(model) if p.key in weights]
    fed = [(key, 1, array) for key, array in weights.items()] + [(key, 0, array) for key, array in (tables or {}).items()]
    slots = [calibration.Slot(keys=[key], weight_inputs=[where], array=array, transposed=[False])
             for key, where, array in fed] if measured else []
    runner = calibration.Runner(source, model, found, slots)
    grams = calibration.grams(runner, data.batches)
    if not measured:
        return grams, None
    batches = datafit.first_samples(data.batches, datafit.SENSITIVITY_SAMPLES)
    reference = calibration.model_outputs(runner, batches)
    feed = {slot.keys[0]: index for index, slot in enumerate(slots)}

    def output_error(key: str, stored: np.ndarray) -> float:
        return datafit.relative_error(reference, calibration.model_outputs(runner, batches, {feed[key]: stored}))

    return grams, output_error


@dataclasses.dataclass(frozen=True)
class QuantizerLoss:
    """--quantize with a --target-* goal: the quantizer's measure on the original (taken once, kept for retries),
    and the loss it added beyond that in written models that missed the goal (cosine loss, or squared relative
    error): a retry (pipeline.optimize_loaded) aims past it."""

    alone: float | None = None
    extra: float = 0.0


def low_rank_goal(goal: datafit.Goal, mode: str, data: datafit.CalibrationData, known: QuantizerLoss,
                  block: int = 32, symmetric: bool = True) -> tuple[datafit.Goal, dict, QuantizerLoss]:
    """The goal the low-rank search must meet so that the quantized model meets `goal`: the quantizer's own
    loss on the original (measured on the held-out samples, unless `known`) is taken off it. Cosine losses add
    (1 − cos), relative errors add in quadrature (independent errors). Returns it, the report's figures, and the
    quantizer's loss (measured)."""
    if not data.heldout:
        raise OnnxlrError("{0} needs held-out samples to measure on: give {1} (e.g. FILE.npz)",
                          f"target_{goal.metric}", "heldout")
    alone = known.alone
    if alone is None:
        quantized = quantize(load_source(data.source), mode, data.batches, block, symmetric)
        alone = goal.measure(outputs(data.source, data.heldout), outputs(quantized, data.heldout),
                             token_inputs(data.heldout))
    if not goal.met(alone):
        raise OnnxlrError(f"{{0}} {mode} alone already gives a held-out {goal.metric} of {alone:.4f}, short of "
                          f"{goal}: no low-rank budget can meet it", "quantize")
    extra = known.extra
    if goal.higher_is_better:  # a cosine's (or a task metric's) losses add
        value = min(1.0, 1.0 - ((1.0 - goal.value) - (1.0 - alone) - extra))
    else:  # at 0 no budget but all dense meets it: the search then keeps every layer
        value = float(np.sqrt(max(goal.value**2 - alone**2 - extra, 0.0)))
    logger.info("%s alone: held-out %s %.4f; the low-rank search aims for %.4f", mode, goal.metric, alone, value)
    figures = {"mode": mode, f"{goal.metric}_alone": alone, "low_rank_goal": value, "extra_loss": extra}
    return datafit.Goal(goal.metric, value), figures, QuantizerLoss(alone=alone, extra=extra)


def missed_by(goal: datafit.Goal, measured: float) -> float:
    """How much loss a retry must find room for (cosine loss, or squared relative error)."""
    return goal.value - measured if goal.higher_is_better else measured**2 - goal.value**2


def load_source(source: str | os.PathLike | bytes) -> ir.Model:
    """The original model again, from what calibration ran it from (a path, or its serialized bytes)."""
    if isinstance(source, bytes):
        import onnx

        return ir.serde.deserialize_model(onnx.load_model_from_string(source))
    return ir.load(source)


def outputs(model: ir.Model | str | os.PathLike | bytes, batches: Sequence[Mapping[str, np.ndarray]]
             ) -> dict[str, np.ndarray]:
    """The model's outputs over the batches, concatenated, padding zeroed (as calibration.model_outputs gives them)."""

    source = ir.to_proto(model).SerializeToString() if isinstance(model, ir.Model) else model
    session = make_session(source, "cpu")
    names = [output.name for output in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        for name, value in zip(names, session.run(names, dict(batch))):
            parts[name].append(np.asarray(value))
    return without_padding({name: (np.concatenate(v) if v[0].ndim and len(v) > 1 else v[0])
                            for name, v in parts.items()}, joined_rows([attention_mask(batch) for batch in batches]))
