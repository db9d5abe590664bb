"""A corpus of broken and hostile inputs, each run through the real `onnxlr optimize` with its expected outcome.

Exit 2 cases: a short message on stderr (no traceback), no output file, no report, nothing left in
the output folder (temporary files included) and every input file byte-for-byte unchanged.
Exit 0 cases: the model is valid but odd; the report says what was skipped and why, and only the
output and its report are written.

The CLI runs in process (click's CliRunner: the same group, error handling and exit codes as the
console script; test_cli.py covers the entry point with subprocesses). The io-level refusals of
the same inputs are in test_io.py; their setups (NOT_A_MODEL, HOSTILE in model_files.py) are reused
here for the CLI. Bad --rank-ratio values (0, -1, 1.5, nan, text) are covered by
test_cli.py::test_bad_flags_...; the output-is-input refusals (spelled differently, symlinks, hard
links, external data) by test_save.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import IR_VERSION
from model_files import HOSTILE, NOT_A_MODEL, matmul_model, save_external, snapshot
from onnx import TensorProto, helper, numpy_helper

from onnxlr.cli import cli

RNG = np.random.default_rng(0)
W64 = RNG.standard_normal((64, 64)).astype(np.float32) / 8
OPSETS = [helper.make_opsetid("", 17)]
ACME = [*OPSETS, helper.make_opsetid("com.acme", 1)]


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[Path], Path]  # writes the input(s) into the given folder; returns INPUT
    args: tuple[str, ...] = ()  # "{in}" stands for the input folder
    exit_code: int = 2
    message: str = ""  # regex stderr must match (exit 2)
    layers: dict[str, str] = dataclasses.field(default_factory=dict)  # node -> status or skip reason regex (exit 0)
    output: str = "{out}/o.onnx"


def _write(folder: Path, model: onnx.ModelProto | bytes, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def _model(nodes, inputs, outputs, initializers=(), opsets=OPSETS, functions=(), value_info=()) -> onnx.ModelProto:
    """A model as given: no shape inference and no checker (many of these are malformed on purpose)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, functions=list(functions))


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _matmul(weight=W64, in_shape=None, out_shape=None, value_info=()) -> onnx.ModelProto:
    rows, cols = weight.shape
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_value("x", in_shape or [1, rows])],
                  [_value("y", out_shape or [1, cols])], [numpy_helper.from_array(weight, "W")], value_info=value_info)


def _conv(weight, x_shape, **attrs) -> onnx.ModelProto:
    return _model([helper.make_node("Conv", ["x", "K"], ["y"], name="conv", **attrs)], [_value("x", x_shape)],
                  [_value("y", None)], [numpy_helper.from_array(weight, "K")])


def _gemm(**attrs) -> onnx.ModelProto:
    return _model([helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm", **attrs)], [_value("x", [2, 64])],
                  [_value("y", None)], [numpy_helper.from_array(W64, "W")])


def _with_weight(mutate: Callable[[onnx.TensorProto], None]) -> onnx.ModelProto:
    model = _matmul()
    mutate(model.graph.initializer[0])
    return model


def _raw(model_fn: Callable[[], onnx.ModelProto | bytes]) -> Callable[[Path], Path]:
    return lambda folder: _write(folder, model_fn())


# ----------------------------------------------------------------------------- malformed graphs


def _cyclic() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["z", "W"], ["a"], name="mm"), helper.make_node("Add", ["x", "a"], ["z"], name="add")]
    return _model(nodes, [_value("x", [1, 64])], [_value("a", [1, 64])], [numpy_helper.from_array(W64, "W")])


def _dangling() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"), helper.make_node("Add", ["a", "ghost"], ["y"], name="add")]
    return _model(nodes, [_value("x", [1, 64])], [_value("y", [1, 64])], [numpy_helper.from_array(W64, "W")])


def _dangling_in_subgraph() -> onnx.ModelProto:
    branch = lambda name, source: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", [source], [f"{name}_out"])], name, [], [_value(f"{name}_out", [1, 64])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", "a"),
                              else_branch=branch("else", "ghost"))]
    return _model(nodes, [_value("x", [1, 64]), _value("cond", [], TensorProto.BOOL)], [_value("y", [1, 64])],
                  [numpy_helper.from_array(W64, "W")])


def _duplicate_outputs() -> onnx.ModelProto:
    model = _matmul()
    model.graph.node.append(helper.make_node("Relu", ["x"], ["y"], name="relu"))
    return model


def _no_ir_version() -> onnx.ModelProto:
    model = _matmul()
    model.ir_version = 0
    return model


def _dangling_output() -> onnx.ModelProto:
    model = _matmul()
    model.graph.output.append(_value("ghost", [1, 64]))
    return model


def _duplicate_input() -> onnx.ModelProto:
    model = _matmul()
    model.graph.input.append(_value("x", [1, 64]))
    return model


def _output_shadows_initializer() -> onnx.ModelProto:
    model = _matmul()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["W"], name="relu"))
    return model


def _mutate_node(change: Callable[[onnx.NodeProto], None]) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        model = _matmul()
        change(model.graph.node[0])
        return model

    return make


def _strings() -> onnx.ModelProto:
    """A valid model with a string input and a string initializer beside the MatMul (labels, say)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Concat", ["labels", "names"], ["all_labels"], name="concat", axis=0)]
    return _model(nodes, [_value("x", [1, 64]), _value("labels", [2], TensorProto.STRING)],
                  [_value("y", [1, 64]), _value("all_labels", [5], TensorProto.STRING)],
                  [numpy_helper.from_array(W64, "W"), numpy_helper.from_array(np.array(["a", "b", "c"], object), "names")])


def _bfloat16() -> onnx.ModelProto:
    import ml_dtypes

    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_value("x", [1, 64], TensorProto.BFLOAT16)],
                  [_value("y", [1, 64], TensorProto.BFLOAT16)],
                  [numpy_helper.from_array(W64.astype(ml_dtypes.bfloat16), "W")])


def _typed_data_short(tensor: onnx.TensorProto) -> None:
    values = numpy_helper.to_array(tensor).ravel()[:100]
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.tolist())


# ----------------------------------------------------------------------------- custom ops


def _acme_function(op: str, body: onnx.NodeProto, inputs: list[str]) -> onnx.FunctionProto:
    return helper.make_function("com.acme", op, inputs, ["o"], [body], opset_imports=OPSETS)


def _custom_between(functions: bool) -> onnx.ModelProto:
    """mm1 -> com.acme:Frob -> mm2; Frob is a model-local function (onnxruntime runs it) or unknown."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("Frob", ["a"], ["b"], name="frob", domain="com.acme"),
             helper.make_node("MatMul", ["b", "W2"], ["y"], name="mm2")]
    frob = [_acme_function("Frob", helper.make_node("Tanh", ["i"], ["o"]), ["i"])] if functions else []
    return _model(nodes, [_value("x", [1, 64])], [_value("y", [1, 64])],
                  [numpy_helper.from_array(W64, "W1"), numpy_helper.from_array(W64.T.copy(), "W2")], opsets=ACME,
                  functions=frob)


def _custom_domain_matmul() -> onnx.ModelProto:
    """com.acme:MatMul is not ai.onnx MatMul: it must be left alone even though its name matches."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="acme_mm", domain="com.acme")]
    body = _acme_function("MatMul", helper.make_node("MatMul", ["i", "w"], ["o"]), ["i", "w"])
    return _model(nodes, [_value("x", [1, 64])], [_value("y", [1, 64])],
                  [numpy_helper.from_array(W64, "W1"), numpy_helper.from_array(W64, "W2")], opsets=ACME,
                  functions=[body])


def _weight_from_custom_op() -> onnx.ModelProto:
    nodes = [helper.make_node("MakeW", ["W2"], ["w2"], name="makew", domain="com.acme"),
             helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2")]
    body = _acme_function("MakeW", helper.make_node("Identity", ["i"], ["o"]), ["i"])
    return _model(nodes, [_value("x", [1, 64])], [_value("y", [1, 64])],
                  [numpy_helper.from_array(W64, "W1"), numpy_helper.from_array(W64, "W2")], opsets=ACME,
                  functions=[body])


# ----------------------------------------------------------------------------- external data and calibration


def _external(case: str) -> Callable[[Path], Path]:
    """model_files' hostile external-data setups (their tmp_path is our input folder's parent)."""

    def make(folder: Path) -> Path:
        path = save_external(matmul_model(), folder / "model.onnx")
        HOSTILE[case][0](folder.parent, path)
        return path

    return make


def _with_calibration(raw: bytes | None = None, **arrays: np.ndarray) -> Callable[[Path], Path]:
    """The 64x64 MatMul model (dynamic batch) and calib.npz holding `arrays` (or the bytes `raw`)."""

    def make(folder: Path) -> Path:
        if raw is not None:
            (folder / "calib.npz").write_bytes(raw)
        else:
            np.savez(folder / "calib.npz", **arrays)
        return _write(folder, _matmul(in_shape=["batch", 64], out_shape=["batch", 64]))

    return make


def _batch_one_with_many_samples(folder: Path) -> Path:
    np.savez(folder / "eval.npz", x=RNG.standard_normal((40, 64)).astype(np.float32))
    return _write(folder, _matmul())  # x is [1, 64]: onnxruntime takes one sample per run


def _bad_zip(folder: Path) -> Path:
    with zipfile.ZipFile(folder / "calib.npz", "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY not really")
    return _write(folder, _matmul(in_shape=["batch", 64]))


def _calibration_folder_without_npz(folder: Path) -> Path:
    (folder / "calib").mkdir()
    (folder / "calib" / "notes.txt").write_text("no arrays here\n")
    return _write(folder, _matmul(in_shape=["batch", 64]))


CALIB = ("--calibration", "{in}/calib.npz")
X8 = RNG.standard_normal((8, 64)).astype(np.float32)
good = _raw(_matmul)


def _not_a_model(case: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "model.onnx"
        setup = NOT_A_MODEL[case][0]
        if setup is not None:
            setup(path)
        return path

    return make


CASES: dict[str, Case] = {
    # Not a model at all (model_files.NOT_A_MODEL, through the CLI).
    **{f"not-a-model-{case}": Case(_not_a_model(case), message=NOT_A_MODEL[case][1]) for case in NOT_A_MODEL},
    "no-ir-version": Case(_raw(_no_ir_version), message="ir_version is missing"),
    # Malformed graphs: refused at load, so also without verification.
    "cyclic-graph": Case(_raw(_cyclic), message="the graph has a cycle .through node 'mm'"),
    "cyclic-graph-no-verify": Case(_raw(_cyclic), ("--no-verify",), message="the graph has a cycle"),
    "dangling-input": Case(_raw(_dangling), message="node 'add' reads 'ghost', which is not a graph input"),
    "dangling-input-dry-run": Case(_raw(_dangling), ("--dry-run",), message="reads 'ghost'"),
    "dangling-input-in-subgraph": Case(_raw(_dangling_in_subgraph), message="reads 'ghost'"),
    "duplicate-output-names": Case(_raw(_duplicate_outputs), message="the graph is malformed"),
    "dangling-graph-output": Case(_raw(_dangling_output), ("--no-verify",),
                                  message="graph output 'ghost' is not produced by any node"),
    "duplicate-graph-input": Case(_raw(_duplicate_input), ("--no-verify",), message="graph input 'x' is declared twice"),
    "node-output-shadows-initializer": Case(_raw(_output_shadows_initializer), ("--no-verify",),
                                            message="node 'relu' writes 'W', which is already"),
    "node-without-op-type": Case(_raw(_mutate_node(lambda n: setattr(n, "op_type", ""))), ("--no-verify",),
                                 message="node 'mm' has no op type"),
    "matmul-with-one-input": Case(_raw(_mutate_node(lambda n: n.input.pop())), ("--no-verify",),
                                  message="node 'mm': MatMul takes 2 inputs, the node has 1"),
    "matmul-with-three-inputs": Case(_raw(_mutate_node(lambda n: n.input.append("x"))), ("--no-verify",),
                                     message="MatMul takes 2 inputs, the node has 3"),
    "tensor-undefined-dtype": Case(_raw(lambda: _with_weight(lambda t: setattr(t, "data_type", 0))),
                                   message="tensor 'W' has no data type"),
    "tensor-dims-exceed-data": Case(_raw(lambda: _with_weight(lambda t: t.dims.__setitem__(1, 65))),
                                    message=r"tensor 'W' holds 16384 bytes of data but its dims \[64, 65\] need 16640"),
    "tensor-huge-dims": Case(_raw(lambda: _with_weight(lambda t: t.dims.extend([2**40]))), ("--no-verify",),
                             message="tensor 'W' holds 16384 bytes of data but its dims"),
    "tensor-negative-dims": Case(_raw(lambda: _with_weight(lambda t: t.dims.__setitem__(0, -64))),
                                 message="tensor 'W' has a negative dimension"),
    "tensor-typed-data-short": Case(_raw(lambda: _with_weight(_typed_data_short)),
                                    message="tensor 'W' holds 100 values of data but its dims .64, 64. need 4096"),
    # Invalid attributes.
    "conv-group-not-dividing": Case(_raw(lambda: _conv(RNG.standard_normal((6, 2, 3, 3)).astype(np.float32),
                                                       [1, 6, 8, 8], group=4)),
                                    message="cannot run the reference model on cpu: .*group"),
    "conv-group-not-dividing-no-verify": Case(
        _raw(lambda: _conv(RNG.standard_normal((6, 2, 3, 3)).astype(np.float32), [1, 6, 8, 8], group=4)),
        ("--no-verify",), exit_code=0, layers={"conv": "group=4 does not divide the 6 output channels"}),
    "conv-group-zero": Case(_raw(lambda: _conv(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32), [1, 4, 8, 8],
                                               group=0)), message="cannot run the reference model"),
    "conv-group-string": Case(_raw(lambda: _conv(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32), [1, 4, 8, 8],
                                                 group="two")), ("--no-verify",),
                              message="node 'conv': attribute 'group' is STRING but Conv takes INT"),
    "conv-strides-wrong-length": Case(_raw(lambda: _conv(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32),
                                                         [1, 4, 8, 8], strides=[1])),
                                      message="cannot load the model on cpu: .*strides has incorrect size"),
    "conv-kernel-shape-mismatch": Case(_raw(lambda: _conv(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32),
                                                          [1, 4, 8, 8], kernel_shape=[5, 5])),
                                       message="kernel_shape is not compatible with W shape"),
    "gemm-alpha-string": Case(_raw(lambda: _gemm(alpha="x")), message="attribute 'alpha' is STRING but Gemm takes FLOAT"),
    "gemm-trans-a-list": Case(_raw(lambda: _gemm(transA=[1, 0])), message="attribute 'transA' is INTS but Gemm takes INT"),
    # Odd weights in a valid model: skipped with the reason.
    "nan-weight": Case(_raw(lambda: _matmul(np.where(np.eye(64, dtype=bool), np.nan, W64).astype(np.float32))),
                       exit_code=0, layers={"mm": "weight has NaN or Inf values"}),
    "inf-weight": Case(_raw(lambda: _matmul(np.where(np.eye(64, dtype=bool), np.inf, W64).astype(np.float32))),
                       exit_code=0, layers={"mm": "weight has NaN or Inf values"}),
    "zero-sized-weight-columns": Case(_raw(lambda: _matmul(np.zeros((64, 0), np.float32))), exit_code=0,
                                      layers={"mm": "weight is empty"}),
    "zero-sized-weight-rows": Case(_raw(lambda: _matmul(np.zeros((0, 64), np.float32))), exit_code=0,
                                   layers={"mm": "weight is empty"}),
    # onnxruntime (>= 1.32) runs a Conv with no output channels, so verification passes on an empty output.
    "zero-sized-conv-weight": Case(_raw(lambda: _conv(np.zeros((0, 3, 3, 3), np.float32), [1, 3, 8, 8])),
                                   exit_code=0, layers={"conv": "weight is empty"}),
    "zero-sized-conv-weight-no-verify": Case(_raw(lambda: _conv(np.zeros((0, 3, 3, 3), np.float32), [1, 3, 8, 8])),
                                             ("--no-verify",), exit_code=0, layers={"conv": "weight is empty"}),
    "zero-sized-input": Case(_raw(lambda: _matmul(in_shape=[0, 64], out_shape=[0, 64])), exit_code=0,
                             layers={"mm": "factorized"}),
    "static-batch-above-batch-size": Case(_raw(lambda: _matmul(in_shape=[40, 64], out_shape=[40, 64])), exit_code=0,
                                          layers={"mm": "factorized"}),
    "string-tensors-beside-the-weights": Case(_raw(_strings), exit_code=0, layers={"mm": "factorized"}),
    "bfloat16-input-cannot-be-synthesized": Case(_raw(_bfloat16),
                                                 message="cannot synthesize input 'x' of dtype bfloat16"),
    "bfloat16-no-verify": Case(_raw(_bfloat16), ("--no-verify",), exit_code=0, layers={"mm": "factorized"}),
    "static-batch-one-with-40-inputs": Case(_batch_one_with_many_samples, ("--inputs", "{in}/eval.npz"), exit_code=0,
                                            layers={"mm": "factorized"}),
    # Huge or hostile declared dimensions.
    "huge-input-dim": Case(_raw(lambda: _matmul(in_shape=[2**40, 64], out_shape=[2**40, 64])),
                           message=r"input 'x' of shape 1099511627776x64 would take \d+ bytes to synthesize"),
    "huge-input-dim-no-verify": Case(_raw(lambda: _matmul(in_shape=[2**40, 64], out_shape=[2**40, 64])),
                                     ("--no-verify",), exit_code=0, layers={"mm": "factorized"}),
    "int64-max-input-dim": Case(_raw(lambda: _matmul(in_shape=[2**63 - 1, 64], out_shape=[2**63 - 1, 64])),
                                message="would take .* bytes to synthesize"),
    "huge-dim-from-shape-flag": Case(_raw(lambda: _matmul(in_shape=["batch", 64], out_shape=["batch", 64])),
                                     ("--shape", f"x:{2**40}x64"), message="would take .* bytes to synthesize"),
    "huge-dim-in-value-info": Case(_raw(lambda: _matmul(value_info=[_value("unused", [2**40, 2**40])])),
                                   exit_code=0, layers={"mm": "factorized"}),
    # A negative declared dim (-1 from some exporters) is dynamic: synthesized like an unnamed one.
    "negative-input-dim": Case(_raw(lambda: _matmul(in_shape=[-5, 64], out_shape=[-5, 64])), exit_code=0,
                               layers={"mm": "factorized"}),
    # External data escaping its folder or not matching (model_files.HOSTILE, through the CLI).
    **{f"external-data-{case}": Case(_external(case), message=HOSTILE[case][1])
       for case in ("dotdot", "absolute", "symlinked-file", "symlinked-folder", "hard-link", "missing", "truncated",
                    "length-short")},
    # Custom-domain ops.
    "custom-op-unknown": Case(_raw(lambda: _custom_between(functions=False)),
                              message="cannot load the model on cpu: .*com.acme:Frob.* is not a registered"),
    "custom-op-unknown-no-verify": Case(_raw(lambda: _custom_between(functions=False)), ("--no-verify",),
                                        exit_code=0, layers={"mm1": "factorized", "mm2": "factorized"}),
    "custom-op-as-function": Case(_raw(lambda: _custom_between(functions=True)), exit_code=0,
                                  layers={"mm1": "factorized", "mm2": "factorized"}),
    "custom-domain-matmul": Case(_raw(_custom_domain_matmul), exit_code=0, layers={"mm1": "factorized"}),
    "weight-from-custom-op": Case(_raw(_weight_from_custom_op), exit_code=0,
                                  layers={"mm1": "factorized", "mm2": "weight comes from custom op com.acme::MakeW"}),
    # Bad flag values (--rank-ratio 0/-1/1.5/nan/text: test_cli.py).
    "rank-zero": Case(good, ("--rank", "0"), message="Invalid value for '--rank': 0 is not in the range x>=1"),
    "rank-negative": Case(good, ("--rank", "-3"), message="Invalid value for '--rank'"),
    "rank-text": Case(good, ("--rank", "many"), message="Invalid value for '--rank'"),
    "rank-ratio-inf": Case(good, ("--rank-ratio", "inf"), message="Invalid value for '--rank-ratio'"),
    **{f"rank-ratio-{label}": Case(good, ("--rank-ratio", value), message="rank.ratio")
       for label, value in (("zero", "0"), ("negative", "-0.25"), ("above-one", "1.5"), ("nan", "nan"),
                            ("text", "quarter"))},
    "mac-budget-zero": Case(good, ("--mac-budget", "0"), message="Invalid value for '--mac-budget'"),
    "target-error-negative": Case(good, ("--target-error", "-1"), message="Invalid value for '--target-error'"),
    "two-rank-policies": Case(good, ("--rank", "4", "--energy", "0.9"), message="choose one rank policy"),
    "energy-zero": Case(good, ("--energy", "0"), message="Invalid value for '--energy'"),
    "energy-above-one": Case(good, ("--energy", "1.5"), message="Invalid value for '--energy'"),
    "param-ratio-zero": Case(good, ("--param-ratio", "0"), message="Invalid value for '--param-ratio'"),
    "param-budget-nan": Case(good, ("--param-budget", "nan"), message="--param-budget must be"),
    "rank-multiple-zero": Case(good, ("--rank-multiple", "0"), message="Invalid value for '--rank-multiple'"),
    "min-params-negative": Case(good, ("--min-params", "-1"), message="Invalid value for '--min-params'"),
    "ops-empty": Case(good, ("--ops", ","), message="--ops is empty"),
    "calibration-samples-zero": Case(_with_calibration(x=X8), (*CALIB, "--calibration-samples", "0"),
                                     message="Invalid value for '--calibration-samples'"),
    "calibration-samples-without-calibration": Case(good, ("--calibration-samples", "4"),
                                                    message="--calibration-samples needs --calibration"),
    "shape-not-dims": Case(good, ("--shape", "x:axb"), message="--shape 'x:axb': expected NAME:DIMxDIM"),
    "shape-unknown-input": Case(good, ("--shape", "nope:1x64"), message="--shape names unknown input"),
    "provider-unknown": Case(good, ("--providers", "abacus"), message="unknown execution provider abacus"),
    "batch-size-zero": Case(good, ("--batch-size", "0"), message="Invalid value for '--batch-size'"),
    # Bad calibration files.
    "calibration-missing-file": Case(good, ("--calibration", "{in}/nope.npz"), message="does not exist"),
    "calibration-not-npz": Case(_with_calibration(raw=b"hello, not a zip\n"), CALIB, message="not a readable .npz"),
    "calibration-empty-file": Case(_with_calibration(raw=b""), CALIB, message="not a readable .npz"),
    "calibration-bad-npy-in-zip": Case(_bad_zip, CALIB, message="not a readable .npz"),
    "calibration-pickled-objects": Case(_with_calibration(x=np.array([{"a": 1}] * 8, dtype=object)), CALIB,
                                        message="not a readable .npz file .Object arrays cannot be loaded"),
    "calibration-missing-input": Case(_with_calibration(z=X8), CALIB, message=r"no array for model input\(s\) x \(has z\)"),
    "calibration-wrong-dtype": Case(_with_calibration(x=X8.astype(np.int64)), CALIB,
                                    message="input 'x' is int64 but the model expects float32"),
    "calibration-float64": Case(_with_calibration(x=X8.astype(np.float64)), CALIB,
                                message="input 'x' is float64 but the model expects float32"),
    "calibration-wrong-rank": Case(_with_calibration(x=X8[:, None]), CALIB,
                                   message="input 'x' has 3 dimensions, the model expects 2"),
    "calibration-wrong-width": Case(_with_calibration(x=X8[:, :63]), CALIB,
                                    message="calibration data does not run through the model"),
    "calibration-no-samples": Case(_with_calibration(x=X8[:0]), CALIB, message="holds no samples"),
    "calibration-nan": Case(_with_calibration(x=np.where(np.eye(8, 64, dtype=bool), np.nan, X8).astype(np.float32)),
                            CALIB, message="NaN|Inf|finite"),
    "calibration-folder-without-npz": Case(_calibration_folder_without_npz, ("--calibration", "{in}/calib"),
                                           message="no .npz files in the calibration folder"),
    # Output path equal to the input (a single-file model; the other spellings: test_save.py).
    "output-is-input": Case(good, output="{in}/model.onnx", message="the output is the input model"),
}

XFAIL: dict[str, pytest.MarkDecorator] = {}  # cases that show a known, not yet fixed bug (none today)


def _run(tmp_path: Path, case: Case):
    folder, out_dir = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out_dir.mkdir()
    source = case.make(folder)
    fill = {"in": str(folder), "out": str(out_dir)}
    output = case.output.format(**fill)
    # --no-gate: these cases are about hostile structure; random weights at the default rank fail the quality gate.
    args = ["optimize", str(source), output, "--report", str(out_dir / "report.json"), "--no-gate",
            *(arg.format(**fill) for arg in case.args)]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, args)
    return result, before


def _check_refused(tmp_path: Path, case: Case, result, before) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception  # nothing escaped the CLI's handler
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 4, result.stderr  # one line; click's usage errors take four
    assert lines[0].startswith(("onnxlr: error: ", "Usage: ")), result.stderr
    assert re.search(case.message, result.stderr), (case.message, result.stderr)
    assert result.stdout == ""
    # No output, no report, no temporary folder; every input byte-for-byte as it was.
    assert snapshot(tmp_path) == before


def _check_succeeded(tmp_path: Path, case: Case, result, before) -> None:
    assert result.exit_code == 0, result.output
    assert result.exception is None and result.stderr == "", result.stderr  # no warnings either
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == {
        k: v for k, v in before.items() if not k.startswith("out")}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["o.onnx", "report.json"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["name"]: row for row in report["layers"]}
    assert set(rows) == set(case.layers), report["layers"]
    for name, expected in case.layers.items():
        row = rows[name]
        if expected == "factorized":
            assert row["status"] == "factorized", row
        else:
            assert row["status"] == "skipped" and re.search(expected, row["reason"]), row
    original = onnx.load(str(next((tmp_path / "in").glob("*.onnx"))))
    written = onnx.load(str(tmp_path / "out" / "o.onnx"))
    # Nodes onnxlr does not factorize (custom ops among them) are still there, as they were.
    kept = [node for node in original.graph.node if rows.get(node.name, {}).get("status") != "factorized"]
    for node in kept:
        assert node in written.graph.node, node
    if "--no-verify" not in case.args and _passes_checker(original):  # onnxlr never makes a valid model invalid
        onnx.checker.check_model(written, full_check=True)


def _passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", [pytest.param(name, marks=XFAIL.get(name, ())) for name in CASES])
def test_hostile_input(tmp_path, name):
    case = CASES[name]
    if name == "not-a-model-fifo" and not hasattr(__import__("os"), "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    result, before = _run(tmp_path, case)
    if case.exit_code == 2:
        _check_refused(tmp_path, case, result, before)
    else:
        _check_succeeded(tmp_path, case, result, before)


def test_verification_feeds_and_compares_string_tensors():
    """String inputs are synthesized and string outputs compared for equality (no float metrics to take);
    onnxlr itself never rewrites string paths, so they must come out equal."""
    from onnxlr.model_io import inputs, io
    from onnxlr.verification import verify

    model = _model([helper.make_node("Identity", ["labels"], ["out"])], [_value("labels", ["n"], TensorProto.STRING)],
                   [_value("out", ["n"], TensorProto.STRING)])
    feeds = inputs.synthesize_inputs(inputs.input_specs(io.load(model).model), samples=3)
    assert feeds["labels"].dtype == object and feeds["labels"].shape == (3,)
    data = model.SerializeToString()
    result = verify.verify(data, data, feeds, ["cpu"], verify.Gates(atol=0.0))
    assert result.passed and result.providers["cpu"]["outputs"]["out"]["mismatched"] == 0
    other = np.array(["x", *feeds["labels"][1:]], dtype=object)
    assert verify.compare_arrays(feeds["labels"], other, verify.Gates())["failure"] == "1 of 3 elements differ"
