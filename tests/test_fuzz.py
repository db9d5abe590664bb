"""Property tests on random valid multi-layer graphs: 2-4 layers mixing MatMul, Gemm and Conv.

test_exactness.py checks each rewrite on one-node models with every attribute combination; this
file chains them (with the Reshape, Relu and layouts between layers that real graphs have), so the
rewrites must also compose: shared names, graph order, the value one rewrite feeds the next.

(a) at full rank with allow_no_gain, onnxruntime gives the original's outputs;
(b) at a random rank ratio (or another policy; random scheme), the model passes onnx.checker and runs with finite outputs of
    the same shapes and dtypes.

A longer campaign: ONNXLR_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py (max_examples of each property).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import assert_outputs_close, init, make_model, run, tensor_input
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from onnx import helper
from onnxlr.passes import REASON_CODES
from test_subnormals import written_subnormals

import onnxlr

EXAMPLES = int(os.environ.get("ONNXLR_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LAYERS = ("matmul_right", "matmul_left", "matmul_shared", "gemm", "conv1d", "conv2d")
OP_OF = {"matmul_right": "MatMul", "matmul_left": "MatMul", "matmul_shared": "MatMul", "gemm": "Gemm",
         "conv1d": "Conv", "conv2d": "Conv"}
# Relative tolerances at full rank: the factors are rounded to the weight's dtype, and each layer of
# the chain adds its own rounding (onnxruntime's fp16 kernels also round every intermediate).
TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "float64": 1e-9}
SUBNORMAL_SCALE = {"float32": 1e-39, "float64": 1e-309}  # what Chain.dead scales a weight's dead rows by


@functools.cache
def ort_cpu_runs(op: str, dtype: str) -> bool:
    """Whether onnxruntime's CPU provider has a kernel for `op` in `dtype` (fp64 Conv it has not)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x_shape, w_shape = {"MatMul": ([2, 3], (3, 4)), "Gemm": ([2, 3], (3, 4)), "Conv": ([1, 2, 5, 5], (3, 2, 3, 3))}[op]
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "probe", [tensor_input("x", x_shape, elem)],
                              [tensor_input("y", None, elem)], [init("w", np.ones(w_shape, dtype))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    try:
        run(model, {"x": np.ones(x_shape, dtype)})
    except Exception:  # onnxruntime's NOT_IMPLEMENTED
        return False
    return True


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass
class Chain:
    """A graph under construction: the current activation's name and (concrete) shape."""

    dtype: str
    rng: np.random.Generator
    name: str = "x"
    shape: tuple[int, ...] = ()
    nodes: list = dataclasses.field(default_factory=list)
    inits: list = dataclasses.field(default_factory=list)
    layers: list = dataclasses.field(default_factory=list)  # (node name, expected status at full rank)
    count: int = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.inits.append(init(name, np.asarray(array)))
        return name

    source: str = "initializer"  # where weights come from: initializer, Constant node, or Transpose of one
    dead: bool = False  # a dead row and column in each weight, scaled to subnormal magnitudes (trained models have them)

    def weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        values = (self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(self.dtype)
        if self.dead and self.dtype != "float16":
            values[(0,) * (values.ndim - 1)] *= SUBNORMAL_SCALE[self.dtype]
            values[..., -1] *= SUBNORMAL_SCALE[self.dtype]
        if self.source == "constant":
            name = self.fresh("W")
            self.nodes.append(helper.make_node("Constant", [], [name], value=init(name, values)))
            return name
        if self.source == "transpose":  # a folded chain: onnxlr reads the weight through it
            perm = list(range(values.ndim))[::-1]
            stored = self.const("Wt", values.transpose(perm).copy())
            name = self.fresh("W")
            self.nodes.append(helper.make_node("Transpose", [stored], [name], perm=perm))
            return name
        return self.const("W", values)

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], expected: str | None = None, **attrs) -> None:
        out = self.fresh("t")
        name = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        if expected is not None:
            self.layers.append((name, expected))
        self.name, self.shape = out, tuple(shape)

    def reshape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != self.shape:
            assert math.prod(shape) == math.prod(self.shape), (shape, self.shape)
            target = self.const("shape", np.array([-1, *shape[1:]], np.int64))
            self.node("Reshape", [self.name, target], shape)


def _matmul_right(draw, chain: Chain) -> None:
    k, n = chain.shape[-1], draw(st.integers(1, 8))
    chain.node("MatMul", [chain.name, chain.weight((k, n), k)], (*chain.shape[:-1], n), "factorized")


def _matmul_shared(draw, chain: Chain) -> None:
    """One square weight read by two MatMuls in a row: factorized once, both users rewritten."""
    k = chain.shape[-1]
    weight = chain.weight((k, k), k)
    for _ in range(2):
        chain.node("MatMul", [chain.name, weight], chain.shape, "factorized")


def _matmul_left(draw, chain: Chain) -> None:
    if len(chain.shape) < 2:
        chain.reshape((1, *chain.shape))
    k, m, n = chain.shape[-2], chain.shape[-1], draw(st.integers(1, 8))
    chain.node("MatMul", [chain.weight((n, k), k), chain.name], (*chain.shape[:-2], n, m), "factorized")


C_SHAPES = ("none", "scalar", "one", "row", "row2d", "column", "full")


def _gemm(draw, chain: Chain) -> None:
    chain.reshape((math.prod(chain.shape[:-1]), chain.shape[-1]))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    if draw(st.sampled_from(["B", "B", "A"])) == "B":  # Gemm(X, W): X is A
        m, k = chain.shape[::-1] if trans_a else chain.shape
        n = draw(st.integers(1, 8))
        weight = chain.weight((n, k) if trans_b else (k, n), k)
        inputs = [chain.name, weight]
    else:  # Gemm(W, X): X is B
        n, k = chain.shape if trans_b else chain.shape[::-1]
        m = draw(st.integers(1, 8))
        weight = chain.weight((k, m) if trans_a else (m, k), k)
        inputs = [weight, chain.name]
    attrs = {"transA": trans_a, "transB": trans_b}
    for key, choices in (("alpha", [None, 1.0, 0.5, -2.0]), ("beta", [None, 1.0, 0.0, 3.0])):
        value = draw(st.sampled_from(choices))
        if value is not None:
            attrs[key] = value
    c_shape = {"none": None, "scalar": (), "one": (1,), "row": (n,), "row2d": (1, n), "column": (m, 1),
               "full": (m, n)}[draw(st.sampled_from(C_SHAPES))]
    if c_shape is not None:
        inputs.append(chain.const("C", chain.rng.standard_normal(c_shape).astype(chain.dtype)))
    chain.node("Gemm", inputs, (m, n), "factorized", **attrs)


def _conv(draw, chain: Chain, dims: int) -> None:
    batch = chain.shape[0]
    rest = math.prod(chain.shape) // batch
    # Channels and spatial sizes that hold the activation's elements (a Reshape gets there).
    channels = draw(st.sampled_from(_divisors(rest)))
    if len(chain.shape) == dims + 2:
        channels, spatial = chain.shape[1], list(chain.shape[2:])
    elif dims == 1:
        spatial = [rest // channels]
    else:
        height = draw(st.sampled_from(_divisors(rest // channels)))
        spatial = [height, rest // channels // height]
    chain.reshape((batch, channels, *spatial))
    group = draw(st.sampled_from([g for g in (1, 1, 2, 3) if channels % g == 0]))
    out_channels = group * draw(st.integers(1, 3))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    kernel, strides, dilations, pads_begin, pads_end, out_spatial = [], [], [], [], [], []
    for size in spatial:
        k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        pb, pe = (draw(st.integers(0, 2)), draw(st.integers(0, 2))) if auto_pad == "NOTSET" else (0, 0)
        if auto_pad.startswith("SAME"):
            d = 1  # onnxruntime cannot run dilated SAME convs
        while (k - 1) * d + 1 > size + pb + pe:  # the (dilated) kernel must fit the padded input
            d, k = (d - 1, k) if d > 1 else (d, k - 1)
        effective = (k - 1) * d + 1
        out_spatial.append(-(-size // s) if auto_pad.startswith("SAME") else (size + pb + pe - effective) // s + 1)
        for values, value in ((kernel, k), (strides, s), (dilations, d), (pads_begin, pb), (pads_end, pe)):
            values.append(value)
    attrs = {"strides": strides, "dilations": dilations}
    if group > 1 or draw(st.booleans()):
        attrs["group"] = group
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    if auto_pad == "NOTSET":
        if any(pads_begin + pads_end) or draw(st.booleans()):
            attrs["pads"] = pads_begin + pads_end
    else:
        attrs["auto_pad"] = auto_pad
    fan_in = channels // group * math.prod(kernel)
    inputs = [chain.name, chain.weight((out_channels, channels // group, *kernel), fan_in)]
    if draw(st.booleans()):
        inputs.append(chain.const("B", chain.rng.standard_normal(out_channels).astype(chain.dtype)))
    depthwise = group > 1 and channels == group
    chain.node("Conv", inputs, (batch, out_channels, *out_spatial), "skipped" if depthwise else "factorized", **attrs)


@st.composite
def chains(draw) -> tuple[onnx.ModelProto, dict[str, np.ndarray], Chain]:
    kinds = draw(st.lists(st.sampled_from(LAYERS), min_size=2, max_size=4))
    ops = {OP_OF[kind] for kind in kinds}
    dtype = draw(st.sampled_from([d for d in ("float32", "float32", "float16", "float64")
                                  if all(ort_cpu_runs(op, d) for op in ops)]))
    chain = Chain(dtype=dtype, rng=np.random.default_rng(draw(st.integers(0, 2**16))),
                  source=draw(st.sampled_from(["initializer", "initializer", "constant", "transpose"])),
                  dead=draw(st.booleans()))
    chain.shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))  # 1-D: a vector input
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    # A symbolic first dim sometimes (every Reshape keeps it with -1).
    declared = ["batch" if draw(st.booleans()) else chain.shape[0], *chain.shape[1:]]
    input_shape = chain.shape
    for kind in kinds:
        if kind == "conv1d":
            _conv(draw, chain, 1)
        elif kind == "conv2d":
            _conv(draw, chain, 2)
        else:
            {"matmul_right": _matmul_right, "matmul_left": _matmul_left, "matmul_shared": _matmul_shared,
             "gemm": _gemm}[kind](draw, chain)
        if draw(st.integers(0, 3)) == 0:
            chain.node("Relu", [chain.name], chain.shape)
    opset = draw(st.sampled_from([13, 17, 21]))
    model = make_model(chain.nodes, [tensor_input("x", declared, elem)], [tensor_input(chain.name, None, elem)],
                       chain.inits, opset=opset)
    inferred = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert all(a in (0, b) for a, b in zip(inferred, chain.shape)), (inferred, chain.shape)  # the generator's own check
    feeds = {"x": chain.rng.standard_normal(input_shape).astype(dtype)}
    return model, feeds, chain


def _describe(model: onnx.ModelProto) -> str:
    return onnx.printer.to_text(model.graph)


@FUZZ
@given(case=chains())
def test_full_rank_chain_is_exact(case):
    model, feeds, chain = case
    new_model, report = onnxlr.optimize(model, rank_ratio=1.0, allow_no_gain=True, verify=False)
    onnx.checker.check_model(new_model, full_check=True)
    statuses = [(layer["name"], layer["status"]) for layer in report["layers"]]
    assert statuses == chain.layers, (report["layers"], _describe(model))
    assert written_subnormals(model, new_model) == 0
    tolerance = TOLERANCE[chain.dtype]
    assert_outputs_close(run(model, feeds), run(new_model, feeds), rtol=tolerance, atol=tolerance)


POLICIES = st.one_of(
    st.fixed_dictionaries({"rank_ratio": st.floats(0.01, 1.0)}),  # the brief's property; the others widen it
    st.fixed_dictionaries({"rank_ratio": st.floats(0.01, 1.0)}),
    st.fixed_dictionaries({"rank": st.integers(1, 10)}),
    st.fixed_dictionaries({"energy": st.floats(0.01, 1.0)}),
    st.fixed_dictionaries({"param_ratio": st.floats(0.01, 1.0)}),
    st.fixed_dictionaries({"param_budget": st.floats(0.01, 1.0)}),
    st.fixed_dictionaries({"mac_budget": st.floats(0.01, 1.0)}),
)


@FUZZ
@given(case=chains(), policy=POLICIES, conv_scheme=st.sampled_from(["auto", "output", "input", "spatial"]),
       allow_no_gain=st.booleans(), rank_multiple=st.sampled_from([1, 1, 2, 8]))
def test_random_rank_chain_is_valid_and_runs(case, policy, conv_scheme, allow_no_gain, rank_multiple):
    model, feeds, chain = case
    try:
        new_model, report = onnxlr.optimize(model, conv_scheme=conv_scheme, allow_no_gain=allow_no_gain,
                                            rank_multiple=rank_multiple, **policy, verify=False)
    except onnxlr.OnnxlrError as exc:
        # A budget below what rank 1 in every layer that can gain already keeps is refused, rightly.
        if ("param_budget" in policy or "mac_budget" in policy) and "is too small" in str(exc):
            reject()
        raise
    onnx.checker.check_model(new_model, full_check=True)
    assert written_subnormals(model, new_model) == 0  # what onnxlr writes never slows x86 kernels down
    assert [layer["name"] for layer in report["layers"]] == [name for name, _ in chain.layers]
    for layer in report["layers"]:
        if layer["status"] == "factorized":
            assert 1 <= layer["rank"] <= layer["full_rank"], layer
        # Every skipped row says why with a stable code; a factorized row has none.
        assert (layer["reason_code"] in REASON_CODES) == (layer["status"] == "skipped"), layer
    reference = run(model, feeds)
    options = ort.SessionOptions()  # the default optimization level too: what a user would run
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(new_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for candidate in (run(new_model, feeds), session.run(None, feeds)):
        assert [(a.shape, a.dtype) for a in candidate] == [(a.shape, a.dtype) for a in reference]
        assert all(np.isfinite(a).all() for a in candidate), _describe(new_model)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_dtype_probe_matches_what_onnxruntime_documents(dtype):
    # The fuzzer draws a dtype only for chains whose ops onnxruntime's CPU provider runs in it:
    # fp16 and fp64 MatMul/Gemm run on CPU; fp64 Conv has no CPU kernel.
    assert ort_cpu_runs("MatMul", dtype) and ort_cpu_runs("Gemm", dtype)
    if dtype == "float64":
        assert not ort_cpu_runs("Conv", dtype)


def test_param_budget_one_keeps_a_thin_layer_dense():
    """Found by the fuzzer: a 64x1 weight has no gaining rank (rank 1 keeps 65 of 64 parameters)."""
    weight = np.random.default_rng(0).standard_normal((64, 1)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="head")
    model = make_model([node], [tensor_input("x", ["batch", 64])], [tensor_input("y", ["batch", 1])],
                       [init("W", weight)])
    new_model, report = onnxlr.optimize(model, param_budget=1.0, verify=False)  # keeping everything always fits a budget of 1
    assert report["layers"][0]["status"] == "skipped"
    assert [node.op_type for node in new_model.graph.node] == ["MatMul"]
