"""Attention Q·Kᵀ head pairs: the query and key projections, joined head by head through the scores.

    Q = X·Wq + bq -> Reshape (b, s, H, d) -> Transpose (0, 2, 1, 3) -> [· or / a scalar] --+
                                                                                            MatMul -> scores
    K = X'·Wk + bk -> Reshape (b, s, H, d) -> Transpose (0, 2, 3, 1) -> [· or / a scalar] --+

Head h's scores are Q_h·K_hᵀ (times the scalars). For d×k matrices A_h and B_h, giving Q's head-h
columns Wq_h·A_h (bias bq_h·A_h) and K's Wk_h·B_h (bk_h·B_h) makes them Q_h·A_h·B_hᵀ·K_hᵀ: keeping k of
the d dimensions of every head shrinks both projections' columns and MACs to k/d, with no node added.
The softmax scale (a constant of the original d, wherever the exporter put it) is left as it is.

The fit (ScoreElimination), two-sided whitened as MoDeGPT's Q·Kᵀ compression: with Σq_h and Σk_h the
second moments of head h's query and key vectors (from the projections' input statistics that
calibration takes anyway: Σq = [Wq; bq]ᵀ·C̃x·[Wq; bq]), the scores' error Σ_ij (q_iᵀ(I − A Bᵀ)k_j)² is
taken as tr((I − A Bᵀ)ᵀ Σq (I − A Bᵀ) Σk) (queries and keys as independent draws), which
A_h·B_hᵀ = Σq^-½·U_k·S_k·V_kᵀ·Σk^-½ minimizes, U·S·Vᵀ the SVD of Σq^½·Σk^½ (ridge as onnxlr.coupled.joint).
The relative error at k is then the tail energy of those singular values, over all heads. Keeping all
d dimensions returns the original weights unchanged, so it is exact.

A pair has no down layer whose outputs show the error: its sensitivity (model output error per unit
of this error) is measured on the model itself, by onnxlr.coupled.plans.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import numpy as np
import onnx_ir as ir

from onnxlr.coupled import joint
from onnxlr.coupled.heads import (
    SPLIT_PERM,
    KeepCurve,
    ShapeEntry,
    as_float,
    block_diagonal,
    data_uses,
    head_split,
    only_reader,
    padded_columns,
    size_reads,
)
from onnxlr.coupled.pairs import Linear, Slice, _attr, _input, _like, _problem, _read_linear, _scalar, _tensor

KEY_PERM = (0, 2, 3, 1)  # (b, s, H, d) -> (b, H, d, s): the keys, transposed for Q·Kᵀ


@dataclasses.dataclass
class ScoreFit:
    kept: np.ndarray  # arange(k)
    query_matrix: np.ndarray  # (d_in, H·k), head-major
    query_bias: np.ndarray | None
    key_matrix: np.ndarray  # (d_in', H·k)
    key_bias: np.ndarray | None
    relative_error: float


@dataclasses.dataclass
class ScorePair:
    """A Q·Kᵀ pair: `up` the query projection, `down` the key projection (the report's partner of the query)."""

    up: Linear
    down: Linear
    heads: int
    width: int  # d
    splits: list[ShapeEntry | None]  # the query's and the key's head-size entries (None: -1, inferred)
    inner: list[ir.Value]

    kind = "attention-qk"
    block = 1
    norm = None
    fixed_params = 0

    def up_layers(self) -> list[Linear]:
        return [self.up]

    def inner_values(self) -> list[ir.Value]:
        return list(self.inner)

    def _layers(self) -> list[Linear]:
        return [self.up, self.down]

    @property
    def weights_per_neuron(self) -> int:
        return self.heads * (self.up.shape[0] + self.down.shape[0])

    def weight_params(self, keep: int) -> int:
        return keep * self.heads * sum(layer.params_per_out for layer in self._layers())

    @property
    def original_params(self) -> int:
        return self.weight_params(self.width)

    def role_params(self, index: int, keep: int) -> tuple[int, int]:
        per_dim = self.heads * self._layers()[index].params_per_out
        return self.width * per_dim, keep * per_dim

    def eliminate(self, correlations: tuple[np.ndarray, np.ndarray], ridge_scale: float = 1e-6) -> ScoreElimination:
        return ScoreElimination.of(self, correlations, ridge_scale)

    def fit_at(self, correlations: tuple[np.ndarray, np.ndarray], keep: int) -> ScoreFit:
        return self.eliminate(correlations).fit(keep)

    def _arrays(self, fit: ScoreFit) -> list[tuple[Linear, np.ndarray, np.ndarray | None]]:
        return [(self.up, fit.query_matrix, fit.query_bias), (self.down, fit.key_matrix, fit.key_bias)]

    def fit_feeds(self, fit: ScoreFit) -> list[tuple[ir.Value, np.ndarray]]:
        """The fit at the original shapes (zero columns for the dropped dimensions: exactly the sliced pair)."""
        feeds = []
        for layer, matrix, bias in self._arrays(fit):
            feeds.append((layer.weight, layer.stored(padded_columns(matrix, self.heads, self.width))))
            if layer.bias is not None:
                assert bias is not None  # a fit of layers with biases refits them
                feeds.append((layer.bias, _like(layer.bias, padded_columns(bias, self.heads, self.width))))
        return feeds

    def fit_slices(self, fit: ScoreFit) -> list[Slice]:
        slices = []
        for layer, matrix, bias in self._arrays(fit):
            slices.append((layer.node, layer.weight, layer.stored(matrix)))
            if layer.bias is not None:
                assert bias is not None
                slices.append((layer.bias_reader, layer.bias, _like(layer.bias, bias)))
        slices += [(entry.node, entry.value, entry.replaced(len(fit.kept))) for entry in self.splits if entry is not None]
        return slices

    def fed_biases(self) -> list[tuple[ir.Node, ir.Value]]:
        return [(layer.bias_reader, layer.bias) for layer in self._layers() if layer.bias is not None]


def _roots(moment: np.ndarray, ridge_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, S⁻¹) with S the symmetric square root of moment + λI."""
    scale = float(np.mean(np.diag(moment))) if len(moment) else 0.0
    ridge = ridge_scale * scale if np.isfinite(scale) and scale > 0 else joint._TINY_RIDGE
    values, vectors = np.linalg.eigh(moment + ridge * np.eye(len(moment)))
    values = np.maximum(values, ridge)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def _head_moments(layer: Linear, correlation: np.ndarray) -> np.ndarray:
    """Σ of the layer's outputs (bias included) from its input's augmented correlation [[G, s], [sᵀ, n]]."""
    matrix = layer.matrix().astype(np.float64)
    bias = layer.bias_array()
    stacked = np.vstack([matrix, (np.zeros(matrix.shape[1]) if bias is None else bias.astype(np.float64))[None]])
    corr = np.asarray(correlation, dtype=np.float64)
    if corr.shape != (len(stacked), len(stacked)):
        raise ValueError(f"correlation is {corr.shape}, expected {(len(stacked), len(stacked))}")
    return stacked.T @ corr @ stacked


@dataclasses.dataclass
class ScoreElimination(KeepCurve):
    """Every k's error of one Q·Kᵀ pair (the singular values' tails) and its fit on demand."""

    pair: ScorePair
    factors: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # per head: Σq^-½, Σk^-½, U, S, Vᵀ
    errors: np.ndarray  # (d + 1,): errors[k]
    plain_share: float = 1.0

    @classmethod
    def of(cls, pair: ScorePair, correlations: tuple[np.ndarray, np.ndarray], ridge_scale: float) -> ScoreElimination:
        query, key = (_head_moments(layer, c) for layer, c in zip((pair.up, pair.down), correlations))
        width, factors, total = pair.width, [], 0.0
        tails = np.zeros(width + 1)
        for head in range(pair.heads):
            own = slice(head * width, (head + 1) * width)
            (q_root, q_inverse), (k_root, k_inverse) = _roots(query[own, own], ridge_scale), _roots(key[own, own], ridge_scale)
            u, s, vt = np.linalg.svd(q_root @ k_root)
            factors.append((q_inverse, k_inverse, u, s, vt))
            energy = s**2
            tails += np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tails[k] = Σ_{i>=k} s_i²
            total += float(energy.sum())
        errors = tails / total if total > 0 else np.zeros(width + 1)
        errors[width] = 0.0
        return cls(pair, factors, errors)

    def fit(self, keep: int) -> ScoreFit:
        self.check(keep)
        pair = self.pair
        layers = (pair.up, pair.down)
        if keep == self.width:  # the original, exactly
            matrices = [(layer.matrix().astype(np.float64), as_float(layer.bias_array())) for layer in layers]
            return ScoreFit(np.arange(keep), *matrices[0], *matrices[1], 0.0)
        transforms: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        for q_inverse, k_inverse, u, s, vt in self.factors:
            root = np.sqrt(s[:keep])
            transforms[0].append(q_inverse @ u[:, :keep] * root)  # A_h
            transforms[1].append(k_inverse @ vt[:keep].T * root)  # B_h
        results = []
        for layer, blocks in zip(layers, transforms):
            reduce = block_diagonal(np.stack(blocks))
            bias = layer.bias_array()
            results.append((layer.matrix().astype(np.float64) @ reduce, None if bias is None else bias.astype(np.float64) @ reduce))
        return ScoreFit(np.arange(keep), *results[0], *results[1], self.error(keep))


# ----------------------------------------------------------------------------- finding pairs


def find_score_pairs(model: ir.Model) -> tuple[list[ScorePair], list[tuple[ir.Node, str]]]:
    """Q·Kᵀ pairs in graph order, found from their query projection; and (query node, reason) for the
    query projections that are not one."""
    found: list[ScorePair] = []
    rejected: list[tuple[ir.Node, str]] = []
    for node in model.graph:
        query = _read_linear(node)
        if query is None:
            continue
        heads_of = _heads_reader(query, SPLIT_PERM)
        if heads_of is None:
            continue
        transpose, product, index, path = heads_of
        if index != 0:
            continue  # values (P·V, onnxlr.coupled.heads) or keys (found from their query)
        result = _score_pair(query, product, path)
        if isinstance(result, ScorePair):
            found.append(result)
        else:
            rejected.append((node, result))
    return found, rejected


def _heads_reader(layer: Linear, perm: tuple[int, ...]) -> tuple[ir.Node, ir.Node, int, list[ir.Value]] | None:
    """(the Transpose, the MatMul reading the heads, at which input, the values on the way) for a projection
    split into heads by Reshape -> Transpose `perm` -> [scalar Mul/Div]; None when it is not."""
    split = only_reader(layer.output, "Reshape", 0)
    transpose = only_reader(split.outputs[0], "Transpose", 0) if split is not None else None
    if transpose is None or tuple(_attr(transpose, "perm", ())) != perm:
        return None
    assert split is not None  # transpose was found through it
    path = [layer.output, split.outputs[0], transpose.outputs[0]]
    value = transpose.outputs[0]
    axis = perm.index(3)  # where the head size went
    uses = data_uses(value)
    if isinstance(uses, str) or size_reads(value, axis, lambda _: False):
        return None  # a run-time read of the head size could feed the scale
    if len(uses) == 1 and uses[0].node.op_type in ("Mul", "Div") and uses[0].idx == 0 and \
            _scalar(_input(uses[0].node, 1)):
        value = uses[0].node.outputs[0]  # a scale on one side: it commutes with A_h (B_h)
        path.append(value)
        uses = data_uses(value)
        if isinstance(uses, str) or size_reads(value, axis, lambda _: False):
            return None
    if len(uses) != 1 or uses[0].node.op_type != "MatMul":
        return None
    return transpose, uses[0].node, uses[0].idx, path


def _score_pair(query: Linear, product: ir.Node, query_path: list[ir.Value]) -> ScorePair | str:
    key_value = _input(product, 1)
    key = _key_projection(key_value)
    if key is None:
        return "query heads whose keys are not a projection split by Reshape -> Transpose (0, 2, 3, 1)"
    heads_of = _heads_reader(key, KEY_PERM)
    if heads_of is None or heads_of[1] is not product:
        return "query heads whose keys are not a projection split by Reshape -> Transpose (0, 2, 3, 1)"
    for layer, what in ((query, "query"), (key, "key")):
        problem = _problem(layer)
        if problem:
            return f"{what} {layer.node.op_type} node '{layer.node.name}': {problem}"
    if query.shape[1] != key.shape[1]:
        return f"the query has {query.shape[1]} columns, the key {key.shape[1]} (grouped or multi-query attention)"
    if _tensor(query.weight).dtype != _tensor(key.weight).dtype:
        return f"weight types differ: {_tensor(query.weight).dtype} and {_tensor(key.weight).dtype}"
    splits = [head_split(layer, _split_of(layer)) for layer in (query, key)]
    for result in splits:
        if isinstance(result, str):
            return result
    found = cast("list[tuple[int, int, ShapeEntry | None]]", splits)  # no reason among them
    (heads, width, query_entry), (key_heads, key_width, key_entry) = found
    if (heads, width) != (key_heads, key_width):
        return f"the query has {heads} heads of {width}, the key {key_heads} of {key_width}"
    return ScorePair(up=query, down=key, heads=heads, width=width, splits=[query_entry, key_entry],
                     inner=query_path + heads_of[3])


def _split_of(layer: Linear) -> ir.Node:
    return next(iter(layer.output.uses())).node


def _key_projection(value: ir.Value) -> Linear | None:
    """The linear layer whose split heads `value` is (through the Transpose and an optional scalar op)."""
    node = value.producer()
    if node is not None and node.op_type in ("Mul", "Div") and _scalar(_input(node, 1)):
        node = _input(node, 0).producer()
    if node is None or node.op_type != "Transpose":
        return None
    split = _input(node, 0).producer()
    if split is None or split.op_type != "Reshape":
        return None
    source = _input(split, 0)
    producer = source.producer()
    if producer is None:
        return None
    if producer.op_type == "Add":  # the bias Add after a MatMul
        for operand in producer.inputs:
            inner = operand.producer() if operand is not None else None
            if inner is not None and (layer := _read_linear(inner)) is not None and layer.output is source:
                return layer
        return None
    layer = _read_linear(producer)
    return layer if layer is not None and layer.output is source else None
