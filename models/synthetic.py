"""Random-weight ONNX models built directly with onnx.helper, covering the layer shapes onnxlr rewrites.

- mlp(): MatMul+Add and Gemm (transB=1 with bias, transB=0 without) layers.
- transformer_block(): Q/K/V/O projections and an MLP on 3-D activations [batch, seq, hidden].
- convnet(): 2-D, 1-D and 3-D Conv with 1x1/3x3/non-square kernels, strides, dilations, symmetric and
  asymmetric pads, grouped and depthwise convs, with and without bias.
- llm_shaped(): an LLM-shaped model written tensor by tensor to external data (see its docstring).

Every model has opset 17, a dynamic "batch" dim and passes onnx.checker.check_model(full_check=True).
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR of the opset-17 era, so older runtimes load these models too


class GraphBuilder:
    """Collects nodes and initializers; each node's output is named after the node."""

    def __init__(self, seed: int):
        self.rng = np.random.RandomState(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        # 1/sqrt(fan_in) keeps activations of order one through a few layers.
        values = self.rng.standard_normal(shape) / np.sqrt(fan_in)
        return self.const(name, values.astype(np.float32))

    def const(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        return make_model(graph)


def make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxlr-models"
    )
    model.ir_version = IR_VERSION
    return model


def float_value(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --- MLP --------------------------------------------------------------------------------------


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (128, 96), out_features: int = 10, seed: int = 0):
    """Dense layers cycling through MatMul+Add, Gemm(transB=1, bias) and Gemm(transB=0, no bias)."""
    g = GraphBuilder(seed)
    sizes = [in_features, *hidden, out_features]
    x = "input"
    for i, (n_in, n_out) in enumerate(pairwise(sizes)):
        style = ("matmul_add", "gemm_transb", "gemm")[i % 3]
        if style == "matmul_add":
            y = g.node("MatMul", [x, g.weight(f"fc{i}.weight", (n_in, n_out), n_in)], f"fc{i}.matmul")
            x = g.node("Add", [y, g.weight(f"fc{i}.bias", (n_out,), n_in)], f"fc{i}")
        elif style == "gemm_transb":
            w, b = g.weight(f"fc{i}.weight", (n_out, n_in), n_in), g.weight(f"fc{i}.bias", (n_out,), n_in)
            x = g.node("Gemm", [x, w, b], f"fc{i}", transB=1)
        else:
            x = g.node("Gemm", [x, g.weight(f"fc{i}.weight", (n_in, n_out), n_in)], f"fc{i}")
        if i < len(sizes) - 2:
            x = g.node("Relu", [x], f"relu{i}")
    g.node("Identity", [x], "output")
    return g.model(
        "mlp",
        [float_value("input", ["batch", in_features])],
        [float_value("output", ["batch", out_features])],
    )


# --- transformer block ------------------------------------------------------------------------


def transformer_block(
    hidden: int = 64, heads: int = 4, intermediate: int = 256, n_layers: int = 2, seed: int = 0
):
    """Post-norm encoder layers: multi-head self-attention (Q/K/V/O MatMul+Add) and a SiLU MLP."""
    if hidden % heads:
        raise ValueError("hidden must be a multiple of heads")
    g = GraphBuilder(seed)
    x = "hidden_states"
    for i in range(n_layers):
        p = f"layer{i}."
        attn = attention(g, x, p, hidden, heads)
        x = layer_norm(g, g.node("Add", [x, attn], p + "attn.residual"), p + "ln1", hidden)
        up = linear(g, x, p + "mlp.up", hidden, intermediate)
        act = g.node("Mul", [up, g.node("Sigmoid", [up], p + "mlp.sigmoid")], p + "mlp.silu")
        down = linear(g, act, p + "mlp.down", intermediate, hidden)
        x = layer_norm(g, g.node("Add", [x, down], p + "mlp.residual"), p + "ln2", hidden)
    g.node("Identity", [x], "output")
    shape = ["batch", "seq", hidden]
    return g.model("transformer_block", [float_value("hidden_states", shape)], [float_value("output", shape)])


def linear(g: GraphBuilder, x: str, name: str, n_in: int, n_out: int) -> str:
    y = g.node("MatMul", [x, g.weight(name + ".weight", (n_in, n_out), n_in)], name + ".matmul")
    return g.node("Add", [y, g.weight(name + ".bias", (n_out,), n_in)], name)


def attention(g: GraphBuilder, x: str, p: str, hidden: int, heads: int) -> str:
    """softmax(Q K^T / sqrt(d)) V over heads, then the output projection."""
    head_dim = hidden // heads
    split = g.const(p + "split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))  # 0 = keep dim

    def project(name: str, perm: list[int]) -> str:
        y = g.node("Reshape", [linear(g, x, p + name, hidden, hidden), split], p + name + ".heads")
        return g.node("Transpose", [y], p + name + ".t", perm=perm)

    q = project("q_proj", [0, 2, 1, 3])  # [batch, heads, seq, head_dim]
    k = project("k_proj", [0, 2, 3, 1])  # [batch, heads, head_dim, seq]
    v = project("v_proj", [0, 2, 1, 3])
    scale = g.const(p + "attn.scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    scores = g.node("Mul", [g.node("MatMul", [q, k], p + "attn.qk"), scale], p + "attn.scores")
    ctx = g.node("MatMul", [g.node("Softmax", [scores], p + "attn.probs", axis=-1), v], p + "attn.ctx")
    ctx = g.node("Transpose", [ctx], p + "attn.ctx.t", perm=[0, 2, 1, 3])
    merge = g.const(p + "merge_heads", np.array([0, 0, hidden], dtype=np.int64))
    ctx = g.node("Reshape", [ctx, merge], p + "attn.ctx.merged")
    return linear(g, ctx, p + "o_proj", hidden, hidden)


def layer_norm(g: GraphBuilder, x: str, name: str, hidden: int) -> str:
    # Scale and bias are near 1 and 0 but not exactly, so that folding them somewhere is never a no-op.
    scale = g.const(name + ".weight", (1 + 0.1 * g.rng.standard_normal(hidden)).astype(np.float32))
    bias = g.const(name + ".bias", (0.1 * g.rng.standard_normal(hidden)).astype(np.float32))
    return g.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-5)


# --- conv -------------------------------------------------------------------------------------

# (out_channels, kernel, strides, pads, dilations, group, bias); pads are [begin..., end...] as in ONNX.
CONV2D = [
    (16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True),  # 3x3
    (32, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, False),  # 1x1, no bias
    (32, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, True),  # stride 2
    (32, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, True),  # dilation 2
    (32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, False),  # grouped
    (32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32, True),  # depthwise
    (16, (3, 1), (1, 2), (1, 0, 1, 0), (1, 1), 1, True),  # non-square kernel and stride
    (16, (2, 2), (1, 1), (0, 0, 1, 1), (1, 1), 1, False),  # asymmetric pads
]
CONV1D = [
    (16, (5,), (1,), (2, 2), (1,), 1, True),
    (16, (3,), (2,), (1, 1), (1,), 1, False),
    (16, (3,), (1,), (2, 2), (2,), 2, True),
    (8, (1,), (1,), (0, 0), (1,), 1, True),
]
CONV3D = [
    (8, (3, 3, 3), (1, 1, 1), (1,) * 6, (1, 1, 1), 1, True),
    (8, (1, 1, 1), (1, 1, 1), (0,) * 6, (1, 1, 1), 1, False),
    (4, (3, 3, 3), (2, 2, 2), (1,) * 6, (1, 1, 1), 1, True),
]
CONV_INPUTS = {"image": (CONV2D, [3, 16, 16]), "signal": (CONV1D, [4, 32]), "volume": (CONV3D, [2, 6, 6, 6])}


def conv_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> int:
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def conv_stack(g: GraphBuilder, x: str, layers: list, shape: list[int]) -> tuple[str, list[int]]:
    """Apply ``layers`` to ``x`` of shape [channels, *spatial] (batch left out); return output and shape."""
    channels, spatial = shape[0], shape[1:]
    rank = len(spatial)
    for i, (out_c, kernel, strides, pads, dilations, group, bias) in enumerate(layers):
        p = f"{x.split('.')[0]}.conv{i}"
        fan_in = channels // group * int(np.prod(kernel))
        inputs = [x, g.weight(p + ".weight", (out_c, channels // group, *kernel), fan_in)]
        if bias:
            inputs.append(g.weight(p + ".bias", (out_c,), fan_in))
        x = g.node(
            "Conv",
            inputs,
            p,
            kernel_shape=kernel,
            strides=strides,
            pads=pads,
            dilations=dilations,
            group=group,
        )
        if i < len(layers) - 1:
            x = g.node("Relu", [x], p + ".relu")
        channels = out_c
        spatial = [
            conv_output_size(s, kernel[d], strides[d], pads[d], pads[d + rank], dilations[d])
            for d, s in enumerate(spatial)
        ]
    return x, [channels, *spatial]


def convnet(seed: int = 0) -> onnx.ModelProto:
    """Three independent conv stacks: "image" (2-D), "signal" (1-D) and "volume" (3-D)."""
    g = GraphBuilder(seed)
    inputs, outputs = [], []
    for name, (layers, shape) in CONV_INPUTS.items():
        y, out_shape = conv_stack(g, name, layers, shape)
        g.node("Identity", [y], name + "_out")
        inputs.append(float_value(name, ["batch", *shape]))
        outputs.append(float_value(name + "_out", ["batch", *out_shape]))
    return g.model("convnet", inputs, outputs)


GENERATORS = {"mlp": mlp, "transformer_block": transformer_block, "convnet": convnet}


# --- LLM-shaped model with external data -------------------------------------------------------

DATA_ALIGNMENT = 4096  # page-aligned tensor offsets let onnxruntime memory-map the weights
WRITE_CHUNK = 1 << 22  # values generated and written per step, bounding memory to a few tens of MB


class ExternalDataWriter:
    """Appends tensors to one .data file and returns TensorProtos that point at them."""

    def __init__(self, data_path: Path, dtype: np.dtype, seed: int):
        self.file = open(data_path, "wb")
        self.location = data_path.name  # relative to the model file, as ONNX requires
        self.dtype = np.dtype(dtype).newbyteorder("<")  # external data is little-endian
        # A Generator rather than RandomState: it draws float32 directly (1.6x faster, half the memory).
        self.rng = np.random.default_rng(seed)
        self.n_params = 0

    def random(self, name: str, shape: tuple[int, ...], std: float) -> TensorProto:
        return self._write(name, shape, lambda n: self.rng.standard_normal(n, dtype=np.float32) * std)

    def ones(self, name: str, shape: tuple[int, ...]) -> TensorProto:
        return self._write(name, shape, lambda n: np.ones(n, dtype=np.float32))

    def _write(self, name: str, shape: tuple[int, ...], values) -> TensorProto:
        self.file.write(b"\0" * (-self.file.tell() % DATA_ALIGNMENT))
        offset = self.file.tell()
        total = int(np.prod(shape))
        for start in range(0, total, WRITE_CHUNK):
            self.file.write(values(min(WRITE_CHUNK, total - start)).astype(self.dtype).tobytes())
        self.n_params += total

        tensor = TensorProto(name=name, dims=shape, data_type=helper.np_dtype_to_tensor_dtype(self.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.location),
            ("offset", offset),
            ("length", total * self.dtype.itemsize),
        ):
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def llm_shaped(
    path: str | Path,
    n_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 176,
    vocab: int = 1000,
    seed: int = 0,
    dtype: str = "float32",
) -> int:
    """Write an LLM-shaped model to ``path`` with every weight in ``<path>.data``; return the parameter count.

    The graph is input_ids -> Gather(embed_tokens) -> n_layers x [norm, q/k/v/o projections, norm,
    gate/up/down MLP] -> norm -> lm_head -> logits, with weights laid out [in, out] as exported
    Hugging Face decoders have them. Attention is replaced by a per-token gate, sigmoid(q) * k + v:
    only the weight shapes matter here. Tensors are generated and written one chunk at a time, so a
    multi-GB model never sits in memory. ``dtype`` is "float32" or "float16" (weights, activations, logits).
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, not {dtype!r}")
    path = Path(path)
    g = GraphBuilder(seed)
    with ExternalDataWriter(path.with_name(path.name + ".data"), np.dtype(dtype), seed) as writer:
        g.initializers.append(writer.random("model.embed_tokens.weight", (vocab, hidden), 1.0))
        x = g.node("Gather", ["model.embed_tokens.weight", "input_ids"], "model.embed_tokens")
        for i in range(n_layers):
            x = _llm_layer(g, writer, x, f"model.layers.{i}.", hidden, intermediate)
        x = _rms_like_norm(g, writer, x, "model.norm", hidden)
        g.initializers.append(writer.random("lm_head.weight", (hidden, vocab), hidden**-0.5))
        g.node("MatMul", [x, "lm_head.weight"], "logits")

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", elem, ["batch", "seq", vocab])
    model = make_model(helper.make_graph(g.nodes, "llm_shaped", [ids], [logits], initializer=g.initializers))
    path.write_bytes(model.SerializeToString())  # small: the weights are all in the .data file
    return writer.n_params


def _llm_layer(g: GraphBuilder, w: ExternalDataWriter, x: str, p: str, hidden: int, intermediate: int) -> str:
    def proj(inp: str, name: str, n_in: int, n_out: int) -> str:
        g.initializers.append(w.random(p + name + ".weight", (n_in, n_out), n_in**-0.5))
        return g.node("MatMul", [inp, p + name + ".weight"], p + name)

    h = _rms_like_norm(g, w, x, p + "input_layernorm", hidden)
    q, k, v = (proj(h, f"self_attn.{n}_proj", hidden, hidden) for n in "qkv")
    gated = g.node("Mul", [g.node("Sigmoid", [q], p + "self_attn.gate"), k], p + "self_attn.gated")
    mixed = g.node("Add", [gated, v], p + "self_attn.mixed")
    x = g.node("Add", [x, proj(mixed, "self_attn.o_proj", hidden, hidden)], p + "attn_residual")

    h = _rms_like_norm(g, w, x, p + "post_attention_layernorm", hidden)
    gate, up = proj(h, "mlp.gate_proj", hidden, intermediate), proj(h, "mlp.up_proj", hidden, intermediate)
    silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], p + "mlp.gate_sigmoid")], p + "mlp.silu")
    act = g.node("Mul", [silu, up], p + "mlp.act")
    return g.node("Add", [x, proj(act, "mlp.down_proj", intermediate, hidden)], p + "mlp_residual")


def _rms_like_norm(g: GraphBuilder, w: ExternalDataWriter, x: str, name: str, hidden: int) -> str:
    # LayerNormalization with a scale only: the single-op stand-in for an LLM's RMSNorm.
    g.initializers.append(w.ones(name + ".weight", (hidden,)))
    return g.node("LayerNormalization", [x, name + ".weight"], name, axis=-1, epsilon=1e-5)


# --- sample inputs and the `build synthetic` entry point --------------------------------------


def random_inputs(model: onnx.ModelProto, batch: int, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs; symbolic dims "batch" and "seq" take the given sizes."""
    rng = np.random.RandomState(seed)
    sizes = {"batch": batch, "seq": seq}
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value or sizes[d.dim_param] for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def build(out_dir: Path) -> dict:
    """One folder per generator: model.onnx, calib.npz (batch 32) and eval.npz (batch 8)."""
    summary = {}
    for name, generator in GENERATORS.items():
        model = generator()
        onnx.checker.check_model(model, full_check=True)
        folder = out_dir / name
        folder.mkdir()
        onnx.save_model(model, folder / "model.onnx")
        calib, evals = random_inputs(model, batch=32, seed=1), random_inputs(model, batch=8, seed=2)
        np.savez(folder / "calib.npz", **calib)
        np.savez(folder / "eval.npz", **evals)
        outputs = run(model, evals)
        if not all(np.isfinite(o).all() for o in outputs):
            raise RuntimeError(f"{name}: non-finite outputs")
        n_params = sum(
            int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT
        )
        summary[name] = {"params": n_params, "ops": sorted({n.op_type for n in model.graph.node})}
        print(f"  {name}: {len(model.graph.node)} nodes, {n_params} params", flush=True)
    return {"models": summary}
