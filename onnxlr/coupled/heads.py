"""Attention V·O head pairs: the value and output projections, joined head by head.

    V = X·Wv + bv                         MatMul [+ Add bias] or Gemm; (b, s, H·d)
        split: Reshape to (b, s, H, d) -> Transpose perm (0, 2, 1, 3)       (b, H, s, d)
    C = P·V                               MatMul reading the split values as its input 1 (P: any
                                          attention probabilities, from any inputs)
        merge: Transpose perm (0, 2, 1, 3) -> Reshape to (b, s, H·d)
    Y = C·Wo + bo                         MatMul [+ Add bias] or Gemm reading the merged context

Head h's context C_h (columns h·d .. h·d + d − 1 of O's input) is P_h·(X·Wv_h + bv_h), so for any d×k
matrix T, giving V's head-h columns Wv_h·T and its bias entries bv_h·T turns the head's context into
C_h·T, whatever P is. Keeping k of the d dimensions of every head (one k for all heads: the Reshape
splits evenly) shrinks V's columns, O's rows and both layers' MACs to k/d, with no node added; the
split Reshape's head-size entry (and the merge's H·d, when it is written out) becomes k (H·k).

The fit (HeadElimination), on the augmented correlation C̃ = Σ [c, 1][c, 1]ᵀ of O's input that
calibration takes anyway (G_hh its head-h block, λ the ridge of onnxlr.coupled.joint):

- T_h = Wo_h·V_k: V_k the top k right singular vectors of L_hᵀ·Wo_h with L_h L_hᵀ = G_hh + λI, the
  whitened SVD of the head's product Wv_h·Wo_h on its contexts (MoDeGPT's V·O compression);
- O's new rows (and bias) by least squares over all heads at once (cross-head terms included):
  [Wo'; bo'] = (Rᵀ C̃ R + λI)⁻¹ Rᵀ C̃ W̃ with R = diag(T_1, .., T_H, 1) and W̃ = [Wo; bo];
- error: ||C̃-weighted residual||² relative to tr(W̃ᵀ C̃ W̃), as onnxlr.joint's pairs measure it.

Keeping all d dimensions returns the original weights unchanged, so it is exact.

Q·Kᵀ pairs (the query and key projections of the same heads) are onnxlr.coupled.scores'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx_ir as ir

from onnxlr.coupled import joint
from onnxlr.coupled.pairs import Linear, Slice, _attr, _const, _input, _like, _problem, _read_linear, _tensor

if TYPE_CHECKING:
    from onnx_ir._core import Usage  # what Value.uses() yields (not exported as ir.Usage)

SPLIT_PERM = (0, 2, 1, 3)  # (b, s, H, d) -> (b, H, s, d); the merge's transpose is the same permutation
HEAD_AXIS = 3  # of (b, H, s, d)
# Attention written as one op (onnxruntime's fusions, ONNX opset 23): reported, not compressed jointly.
FUSED_ATTENTION = frozenset({("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                             ("com.microsoft", "GroupQueryAttention"), ("", "Attention"), ("ai.onnx", "Attention")})
QUERY_OR_KEY = "query or key heads: a Q·Kᵀ pair is found from its query projection (onnxlr.coupled.scores)"


@dataclasses.dataclass
class ShapeEntry:
    """One entry of a Reshape's constant shape that holds the head size d (or H·d): the constant
    input of `node` (the Reshape, or the Concat building its shape) to replace, and where in it."""

    node: ir.Node
    value: ir.Value
    position: int

    def replaced(self, entry: int) -> np.ndarray:
        array = _tensor(self.value).numpy().copy()
        array.reshape(-1)[self.position] = entry
        return array


@dataclasses.dataclass
class HeadFit:
    """Every head keeps `len(kept)` dimensions: V's new columns (head-major: head h owns h·k .. h·k + k − 1),
    O's new rows in the same order, and the refitted O bias."""

    kept: np.ndarray  # arange(k): the report's "kept of width"
    transforms: np.ndarray  # (H, d, k): T_h
    value_matrix: np.ndarray  # (d_in, H·k) X·W, float64
    value_bias: np.ndarray | None  # (H·k,)
    down_matrix: np.ndarray  # (H·k, d_out)
    down_bias: np.ndarray | None  # (d_out,)
    relative_error: float


@dataclasses.dataclass
class HeadPair:
    """A V·O pair (see the module docstring): `width` is the head size d, the inner dimension it shrinks."""

    up: Linear  # the value projection
    down: Linear  # the output projection
    activation: ir.Value  # O's input: the merged context
    heads: int  # H
    width: int  # d
    split: ShapeEntry | None  # None: the split's head-size entry is -1 (inferred)
    merge: ShapeEntry | None  # None: the merge's last entry is -1
    inner: list[ir.Value]  # V's output .. O's input: their head-size axis shrinks
    context: ShapeEntry | None = None  # a Reshape of the context back to (b, H, s, d) (SDPA exports), d written out

    kind = "attention-vo"
    block = 1
    norm = None

    def up_layers(self) -> list[Linear]:
        return [self.up]

    def inner_values(self) -> list[ir.Value]:
        return list(self.inner)

    def down_matrix(self) -> np.ndarray:
        return self.down.matrix()

    def down_bias(self) -> np.ndarray | None:
        return self.down.bias_array()

    # ------------------------------------------------------------------ costs

    @property
    def fixed_params(self) -> int:
        return 0 if self.down.bias is None else self.down.shape[1]

    @property
    def weights_per_neuron(self) -> int:
        """Weight parameters one kept dimension costs: a column of V and a row of O in every head."""
        return self.heads * (self.up.shape[0] + self.down.shape[1])

    def weight_params(self, keep: int) -> int:
        return keep * self.heads * self.up.params_per_out + keep * self.heads * self.down.shape[1] + self.fixed_params

    @property
    def original_params(self) -> int:
        return self.weight_params(self.width)

    def role_params(self, index: int, keep: int) -> tuple[int, int]:
        """(before, after) parameters of the value layer (index 0) or the output layer (index 1)."""
        if index == 0:
            return self.width * self.heads * self.up.params_per_out, keep * self.heads * self.up.params_per_out
        rows = self.heads * self.down.shape[1]
        return self.width * rows + self.fixed_params, keep * rows + self.fixed_params

    # ------------------------------------------------------------------ fits

    def eliminate(self, correlation: np.ndarray, ridge_scale: float = 1e-6) -> HeadElimination:
        return HeadElimination.of(self, correlation, ridge_scale)

    def fit_at(self, correlation: np.ndarray, keep: int) -> HeadFit:
        return self.eliminate(correlation).fit(keep)

    def effective_down(self, fit: HeadFit) -> tuple[np.ndarray, np.ndarray | None]:
        """(H·d, d_out) M and bias with c·M + bias the fitted pair's output for the original context c."""
        return block_diagonal(fit.transforms) @ fit.down_matrix, fit.down_bias

    def fit_feeds(self, fit: HeadFit) -> list[tuple[ir.Value, np.ndarray]]:
        """The fit at the original shapes (zeros for the dropped dimensions: exactly the sliced pair)."""
        feeds = [(self.up.weight, self.up.stored(padded_columns(fit.value_matrix, self.heads, self.width))),
                 (self.down.weight, self.down.stored(padded_columns(fit.down_matrix.T, self.heads, self.width).T))]
        if self.up.bias is not None:
            assert fit.value_bias is not None  # a fit of layers with biases refits them
            feeds.append((self.up.bias, _like(self.up.bias, padded_columns(fit.value_bias, self.heads, self.width))))
        if self.down.bias is not None:
            assert fit.down_bias is not None
            feeds.append((self.down.bias, _like(self.down.bias, fit.down_bias)))
        return feeds

    def fit_slices(self, fit: HeadFit) -> list[Slice]:
        keep = len(fit.kept)
        slices = [(self.up.node, self.up.weight, self.up.stored(fit.value_matrix)),
                  (self.down.node, self.down.weight, self.down.stored(fit.down_matrix))]
        if self.up.bias is not None:
            assert fit.value_bias is not None  # a fit of layers with biases refits them
            slices.append((self.up.bias_reader, self.up.bias, _like(self.up.bias, fit.value_bias)))
        if self.down.bias is not None:
            assert fit.down_bias is not None
            slices.append((self.down.bias_reader, self.down.bias, _like(self.down.bias, fit.down_bias)))
        if self.split is not None:
            slices.append((self.split.node, self.split.value, self.split.replaced(keep)))
        if self.merge is not None:
            slices.append((self.merge.node, self.merge.value, self.merge.replaced(self.heads * keep)))
        if self.context is not None:
            slices.append((self.context.node, self.context.value, self.context.replaced(keep)))
        return slices

    def fed_biases(self) -> list[tuple[ir.Node, ir.Value]]:
        """The biases a fit changes (the weights are their groups' feeds)."""
        return [(layer.bias_reader, layer.bias) for layer in (self.up, self.down) if layer.bias is not None]


def padded_columns(array: np.ndarray, heads: int, width: int) -> np.ndarray:
    """(…, H·k) head-major columns placed at (…, H·d): head h's k in its first k of d, zeros elsewhere (a fit
    fed at the original shapes computes exactly what the sliced heads compute)."""
    keep = array.shape[-1] // heads
    full = np.zeros(array.shape[:-1] + (heads, width))
    full[..., :keep] = array.reshape(array.shape[:-1] + (heads, keep))
    return full.reshape(array.shape[:-1] + (heads * width,))


def block_diagonal(transforms: np.ndarray) -> np.ndarray:
    """diag(T_1, .., T_H) of a (H, d, k) stack: (H·d, H·k)."""
    heads, width, keep = transforms.shape
    result = np.zeros((heads * width, heads * keep))
    for head in range(heads):
        result[head * width:(head + 1) * width, head * keep:(head + 1) * keep] = transforms[head]
    return result


class _Heads(Protocol):
    @property
    def width(self) -> int: ...


class KeepCurve:
    """What the head pairs' eliminations share: every k's error read off `errors`, and the range check."""

    pair: _Heads  # HeadPair, scores.ScorePair: the head size d
    errors: np.ndarray  # (d + 1,): errors[k]

    @property
    def width(self) -> int:
        return self.pair.width

    def check(self, keep: int) -> None:
        if not 1 <= keep <= self.width:
            raise ValueError(f"keep must be within 1..{self.width}, got {keep}")

    def error(self, keep: int) -> float:
        self.check(keep)
        return float(self.errors[keep])


@dataclasses.dataclass
class HeadElimination(KeepCurve):
    """Every k's fit of one V·O pair, priced without a second look at the data (as joint.Elimination)."""

    pair: HeadPair
    weights: np.ndarray  # W̃: O's matrix, with its bias row when it has one
    corr: np.ndarray  # C̃ restricted as joint._problem does
    ridge: float
    directions: np.ndarray  # (H, d_out, d): each head's right singular vectors, strongest first
    errors: np.ndarray  # (d + 1,): errors[k]
    plain_share: float

    @classmethod
    def of(cls, pair: HeadPair, correlation: np.ndarray, ridge_scale: float) -> HeadElimination:
        weights, corr, ridge = joint._problem(pair.down_matrix(), pair.down_bias(), correlation, ridge_scale)
        heads, width = pair.heads, pair.width
        plain = np.asarray(pair.down_matrix(), dtype=np.float64)
        directions = np.zeros((heads, plain.shape[1], width))  # zero columns past d_out when d_out < d
        for head in range(heads):
            own = slice(head * width, (head + 1) * width)
            values, vectors = np.linalg.eigh(corr[own, own] + ridge * np.eye(width))
            whitened = (vectors * np.sqrt(np.maximum(values, 0.0))).T @ plain[own]  # L_hᵀ·Wo_h
            strongest = np.linalg.svd(whitened, full_matrices=False)[2][:width]
            directions[head][:, :len(strongest)] = strongest.T
        total = float(np.sum(weights * (corr @ weights)))
        plain_total = float(np.sum(plain * (corr[:len(plain), :len(plain)] @ plain)))
        result = cls(pair, weights, corr, ridge, directions, np.zeros(width + 1), plain_total / total if total > 0 else 1.0)
        for keep in range(1, width):  # errors[width] = 0: all d dimensions are the original
            result.errors[keep] = result._solve(keep)[2]
        return result

    def _transforms(self, keep: int) -> np.ndarray:
        plain = np.asarray(self.pair.down_matrix(), dtype=np.float64)
        width = self.pair.width
        return np.stack([plain[h * width:(h + 1) * width] @ self.directions[h][:, :keep] for h in range(self.pair.heads)])

    def _solve(self, keep: int) -> tuple[np.ndarray, np.ndarray, float]:
        """T (H, d, k), the refitted rows of W̃ ((H·k [+1]) × d_out) and the relative error."""
        transforms = self._transforms(keep)
        reduce = block_diagonal(transforms)
        if len(self.weights) > len(reduce):  # the bias row rides on the constant column
            reduce = np.block([[reduce, np.zeros((len(reduce), 1))], [np.zeros((1, reduce.shape[1])), np.ones((1, 1))]])
        projected = reduce.T @ self.corr
        fitted = joint._spd_solve(projected @ reduce + self.ridge * np.eye(reduce.shape[1]), projected @ self.weights)
        residual = self.weights - reduce @ fitted
        total = float(np.sum(self.weights * (self.corr @ self.weights)))
        lost = float(np.sum(residual * (self.corr @ residual)))
        return transforms, fitted, max(lost, 0.0) / total if total > 0 else 0.0

    def fit(self, keep: int) -> HeadFit:
        self.check(keep)
        pair = self.pair
        if keep == self.width:  # the original, exactly
            transforms = np.broadcast_to(np.eye(keep), (pair.heads, keep, keep)).copy()
            return HeadFit(np.arange(keep), transforms, pair.up.matrix().astype(np.float64), as_float(pair.up.bias_array()),
                           pair.down_matrix().astype(np.float64), as_float(pair.down_bias()), 0.0)
        transforms, fitted, error = self._solve(keep)
        reduce = block_diagonal(transforms)
        value_bias = pair.up.bias_array()
        rows = pair.heads * keep
        return HeadFit(np.arange(keep), transforms, pair.up.matrix().astype(np.float64) @ reduce,
                       None if value_bias is None else value_bias.astype(np.float64) @ reduce, fitted[:rows],
                       fitted[rows] if pair.down.bias is not None else None, error)


def as_float(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array, dtype=np.float64).copy()


# ----------------------------------------------------------------------------- finding pairs


def find_head_pairs(model: ir.Model) -> tuple[list[HeadPair], list[tuple[ir.Node, str]]]:
    """V·O pairs in graph order; and (node, reason) for projections split into heads that are not one
    (the query and key projections among them)."""
    found: list[HeadPair] = []
    rejected: list[tuple[ir.Node, str]] = []
    for node in model.graph:
        if (node.domain, node.op_type) in FUSED_ATTENTION:
            rejected.append((node, f"fused {node.op_type} op: its heads are not compressed jointly (the "
                                   "projections around it are factorized per matrix)"))
            continue
        layer = _read_linear(node)
        if layer is None:
            continue
        split = only_reader(layer.output, "Reshape", 0)
        if split is None:
            continue  # not split into heads: not a candidate
        result = _head_pair(layer, split)
        if isinstance(result, HeadPair):
            found.append(result)
        else:
            rejected.append((node, result))
    return found, rejected


def _head_pair(up: Linear, split: ir.Node) -> HeadPair | str:
    problem = _problem(up)
    if problem:
        return problem
    inner = [up.output, split.outputs[0]]
    transpose = only_reader(split.outputs[0], "Transpose", 0)
    if transpose is None or tuple(_attr(transpose, "perm", ())) not in (SPLIT_PERM, (0, 2, 3, 1)):
        return "split into heads, but not by a Transpose (0, 2, 1, 3) or (0, 2, 3, 1)"
    values = transpose.outputs[0]
    inner.append(values)
    uses = data_uses(values)
    if isinstance(uses, str) or len(uses) != 1:
        return "the heads are not read by one node"
    product, index = uses[0].node, uses[0].idx
    if product.op_type in ("Mul", "Div") or (product.op_type == "MatMul" and index == 0) or \
            tuple(_attr(transpose, "perm", ())) != SPLIT_PERM:
        return QUERY_OR_KEY  # scaled, or the left side of a product, or transposed for it
    if product.op_type != "MatMul":
        return "the heads are not read by one MatMul"
    context = product.outputs[0]
    inner.append(context)
    sources = {id(values), id(context)}  # where a run-time read of the head size is the new k
    for value in (values, context):
        problem = size_reads(value, HEAD_AXIS, lambda read: _feeds_context_shape(read, context))
        if problem:
            return problem
    found = _context_reshape(context, sources)
    if isinstance(found, str):
        return found
    reshape, context_entry = found
    if reshape is not None:
        context = reshape.outputs[0]
        inner.append(context)
    merge_transpose = only_reader(context, "Transpose", 0)
    if merge_transpose is None or tuple(_attr(merge_transpose, "perm", ())) != SPLIT_PERM:
        return "the attention's context is not merged by a Transpose (0, 2, 1, 3)"
    inner.append(merge_transpose.outputs[0])
    merge = only_reader(merge_transpose.outputs[0], "Reshape", 0)
    if merge is None:
        return "the attention's context is not merged by a Reshape"
    inner.append(merge.outputs[0])
    uses = list(merge.outputs[0].uses())
    down = _read_linear(uses[0].node) if len(uses) == 1 and uses[0].idx == 0 else None
    if down is None or merge.outputs[0].is_graph_output():
        return "the merged context is not read by one linear layer alone"
    problem = _problem(down)
    if problem:
        return f"output {down.node.op_type} node '{down.node.name}': {problem}"
    size = up.shape[1]
    if down.shape[0] != size:
        return f"widths differ: the values have {size} columns, '{down.node.name}' reads {down.shape[0]}"
    if _tensor(up.weight).dtype != _tensor(down.weight).dtype:
        return f"weight types differ: {_tensor(up.weight).dtype} and {_tensor(down.weight).dtype}"
    return _with_shapes(up, down, split, merge, inner, context_entry)


def _with_shapes(up: Linear, down: Linear, split: ir.Node, merge: ir.Node, inner: list[ir.Value],
                 context_entry: ShapeEntry | None = None) -> HeadPair | str:
    """The pair once the split's (H, d) and the merge's H·d are read off their constant entries."""
    found = head_split(up, split)
    if isinstance(found, str):
        return found
    heads, width, editable = found
    size = up.shape[1]
    merge_entries = _trailing_entries(merge, 1)
    if merge_entries is None or merge_entries[0][1] not in (-1, size):
        return f"the merge's shape does not end in a constant -1 or {size}"
    merge_entry, merged = merge_entries[0]
    if context_entry is not None and _tensor(context_entry.value).numpy().reshape(-1)[context_entry.position] != width:
        return f"the context's reshape does not end in the head size {width}"
    return HeadPair(up=up, down=down, activation=merge.outputs[0], heads=heads, width=width, split=editable,
                    merge=merge_entry if merged == size else None, inner=inner, context=context_entry)


def head_split(layer: Linear, split: ir.Node) -> tuple[int, int, ShapeEntry | None] | str:
    """(H, d, the entry holding d, None when it is -1) of the Reshape splitting the layer's outputs into heads."""
    size = layer.shape[1]
    split_entries = _trailing_entries(split, 2)
    if split_entries is None:
        return "the head split's shape does not end in constant (heads, head size) entries"
    (_, heads_value), (head_entry, head_size) = split_entries
    if head_size > 0:
        width, editable = head_size, head_entry  # the head size is written out: it becomes k
    elif heads_value > 0:
        width, editable = size // heads_value, None  # (H, -1): the head size is inferred, k too
    else:
        return "the head split's shape has neither a constant head size nor a constant head count"
    heads = size // width if width and size % width == 0 else 0
    if not heads or heads_value not in (-1, heads):
        return f"the head split ({heads_value}, {head_size}) does not divide {size} columns"
    return heads, width, editable


def _trailing_entries(reshape: ir.Node, count: int) -> list[tuple[ShapeEntry, int]] | None:
    """The last `count` entries of a Reshape's shape, each as (where it is stored, its value), when they
    are constants: the shape itself, or the trailing constant inputs of the Concat (axis 0) building it."""
    if len(reshape.inputs) < 2 or reshape.inputs[1] is None or _attr(reshape, "allowzero", 0):
        return None
    shape = reshape.inputs[1]
    pieces: list[tuple[ir.Node, ir.Value | None]]
    if _const(shape) is not None:
        pieces = [(reshape, shape)]
    else:
        concat = shape.producer()
        if concat is None or concat.op_type != "Concat" or _attr(concat, "axis", 0) != 0 or \
                len(list(shape.uses())) != 1 or shape.is_graph_output():
            return None  # a shape shared with another Reshape would change it too
        pieces = [(concat, value) for value in concat.inputs]
    entries: list[tuple[ShapeEntry, int]] = []
    for node, value in reversed(pieces):
        tensor = _const(value) if value is not None else None
        if tensor is None or tensor.dtype != ir.DataType.INT64:
            return None
        assert value is not None  # it has a tensor
        array = tensor.numpy().reshape(-1)
        for position in range(len(array) - 1, -1, -1):
            entries.insert(0, (ShapeEntry(node, value, position), int(array[position])))
            if len(entries) == count:
                return entries
    return None


def data_uses(value: ir.Value) -> list[Usage] | str:
    """The uses of `value` other than Shape nodes (which read its shape, not its values; size_reads checks them)."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    return [use for use in value.uses() if not _is_shape(use.node)]


def size_reads(value: ir.Value, axis: int, allowed: Callable[[ir.Value], bool]) -> str | None:
    """Why the Shape nodes reading `value` (rank 4) block shrinking its `axis`, or None: each must be read
    by Gathers of constant indices, and one that reads `axis` is allowed only where `allowed` says so
    (SDPA exports read the head size to reshape the context; a size feeding a scale would change it)."""
    for use in value.uses():
        if not _is_shape(use.node):
            continue
        shape = use.node
        if "start" in shape.attributes or "end" in shape.attributes:
            return f"Shape node '{shape.name}' reads a slice of the heads' shape"
        for read in shape.outputs[0].uses():
            gather = read.node
            index = _const(_input(gather, 1)) if gather.op_type == "Gather" and read.idx == 0 else None
            if index is None or index.size != 1 or _attr(gather, "axis", 0) != 0:
                return f"the heads' shape is read by {gather.op_type} node '{gather.name}'"
            if int(index.numpy().reshape(-1)[0]) % 4 == axis and not allowed(gather.outputs[0]):
                return f"the head size is read at run time by Gather node '{gather.name}'"
    return None


def _is_shape(node: ir.Node) -> bool:
    return node.op_type == "Shape" and node.domain in ("", "ai.onnx")


def _feeds_context_shape(size: ir.Value, context: ir.Value) -> bool:
    """Whether a run-time head size only ends, through Unsqueeze and Concat, as the last entry of the shape
    of a Reshape of `context` (SDPA's (b, H, s, d) reshape of P·V: the size is then the new k)."""
    for use in size.uses():
        unsqueeze = use.node
        if unsqueeze.op_type != "Unsqueeze":
            return False
        for inner in unsqueeze.outputs[0].uses():
            concat = inner.node
            if concat.op_type != "Concat" or inner.idx != len(concat.inputs) - 1:
                return False
            if any(u.node.op_type != "Reshape" or u.idx != 1 or u.node.inputs[0] is not context
                   for u in concat.outputs[0].uses()):
                return False
    return True


def _context_reshape(context: ir.Value, sources: set[int]) -> tuple[ir.Node | None, ShapeEntry | None] | str:
    """An optional Reshape of P·V to (b, H, s, d) before the merge (SDPA exports): (the Reshape, its constant
    head-size entry to rewrite, or None when it is -1 or read at run time from the heads); (None, None)
    when the context goes straight to the merge's Transpose."""
    uses = data_uses(context)
    if isinstance(uses, str) or len(uses) != 1:
        return "the attention's context is read by more than the merge"
    reshape = uses[0].node
    if reshape.op_type != "Reshape" or uses[0].idx != 0:
        return None, None
    if any(_is_shape(u.node) for u in reshape.outputs[0].uses()):
        return "the reshaped context's shape is read at run time"
    entries = _trailing_entries(reshape, 1)
    if entries is not None:
        entry, value = entries[0]
        return reshape, (entry if value != -1 else None)
    shape = reshape.inputs[1]
    concat = shape.producer() if shape is not None else None
    last = concat.inputs[-1] if concat is not None and concat.op_type == "Concat" and concat.inputs else None
    if last is None or not _reads_head_size(last, sources):
        return "the context's reshape does not end in a constant or a run-time read of the head size"
    return reshape, None


def _reads_head_size(value: ir.Value, sources: set[int]) -> bool:
    """Whether `value` is Unsqueeze(Gather(Shape(v), head axis)) of one of the `sources` (by id)."""
    unsqueeze = value.producer()
    gather = _input(unsqueeze, 0).producer() if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" else None
    shape = _input(gather, 0).producer() if gather is not None and gather.op_type == "Gather" else None
    if shape is None or not _is_shape(shape) or id(shape.inputs[0]) not in sources:
        return False
    assert gather is not None  # shape was found through it
    index = _const(_input(gather, 1))
    return index is not None and index.size == 1 and int(index.numpy().reshape(-1)[0]) % 4 == HEAD_AXIS


def only_reader(value: ir.Value, op_type: str, index: int) -> ir.Node | None:
    """The one node reading `value`, when it is an `op_type` reading it at `index` (and it is no graph output)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != op_type or node.domain not in ("", "ai.onnx") or uses[0].idx != index:
        return None
    return node
