"""Joint compression of an MLP pair: keep k of its D intermediate neurons and refit the down layer.

An MLP pair is Y = act(X·W1 + b1)·W2 + b2 with inner width D (W1: d_in × D, W2: D × d2). Joint
compression keeps a set S of k neurons: the columns S of W1 and entries S of b1 are sliced out
unchanged, and the second layer is REFITTED by least squares so that Z_S·W2' + b2' ≈ Z·W2 + b2 on the
calibration activations Z = act(X·W1 + b1). The parameters and MACs of both weights fall to k/D
and the graph gets no new node (two weights and a bias are just narrower).

Statistics: the activations are never kept. They stream, batch by batch, into ONE float64 matrix,
the augmented correlation C = Σ z̃ z̃ᵀ with z̃ = [z, 1] ((D+1) × (D+1), see AugmentedGram); its
last row/column is the constant column that carries the bias.

With W̃ = [W2; b2] (the bias row is the constant column's weight and is never dropped; without a
down bias the constant column plays no part and the bias stays absent) and a ridge
λ = ridge_scale · mean(diag C[:D, :D]) (a tiny absolute value when that is 0):

- score (Optimal Brain Surgeon): s_j = ||W̃[j, :]||² / [(C + λI)⁻¹]_jj, the output error caused by
  dropping neuron j alone while all the others are refitted (obs_scores);
- selection: greedy OBS elimination. The neuron with the lowest score is dropped, the inverse and
  W̃ are updated as the surgeon's refit does (rank-one downdates), the scores recomputed, and so on
  until k remain (ties: the higher index goes first). The first step is exactly "drop the lowest
  s_j"; re-scoring after each drop is what lets one of two near-identical neurons go while the
  other stays (one-shot scores would rate both as cheap and could drop both);
- refit: with T = S ∪ {constant column}, [W2'; b2'] = (C_TT + λI)⁻¹ · C_T,: · W̃;
- error: e(k) = tr(Rᵀ C R) / tr(W̃ᵀ C W̃) with R = W̃ − P, P the refit scattered back to the full
  rows (zeros at dropped neurons), i.e. ||Z̃W̃ − Z̃P||² / ||Z̃W̃||² on the calibration rows.

Keeping all D neurons returns the original W2 and b2 unchanged (no refit), so it is exact.

Blocks (`block` > 1, conv channel pairs): neuron j owns the rows J = j·block .. j·block + block − 1
of W̃ and of C (the constant column stays last). Its score is s_j = tr(W̃_Jᵀ ([H⁻¹]_JJ)⁻¹ W̃_J) with
H = C + λI, dropping it updates H⁻¹ −= H⁻¹[:, J] ([H⁻¹]_JJ)⁻¹ H⁻¹[J, :] and W̃ −= H⁻¹[:, J] ([H⁻¹]_JJ)⁻¹ W̃_J,
and the refit solves over T = the kept neurons' rows (+ the constant column). `kept` stays neuron
indices; the refitted down matrix has k·block rows. block = 1 is the scalar case above, same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.linalg

_TINY_RIDGE = 1e-12  # absolute ridge when the activations are all zero
_FLUSH = 256  # greedy elimination: pending rank-one updates applied together (BLAS3) every _FLUSH steps


@dataclasses.dataclass
class AugmentedGram:
    """Σ [z, 1][z, 1]ᵀ in float64 over streamed (n, D) batches of rows."""

    gram: np.ndarray | None = None
    count: int = 0

    def add(self, vectors: np.ndarray) -> None:
        rows = np.asarray(vectors, dtype=np.float64)
        rows = rows.reshape(-1, rows.shape[-1])
        width = rows.shape[1]
        if self.gram is None:
            self.gram = np.zeros((width + 1, width + 1))
        elif self.gram.shape[0] != width + 1:
            raise ValueError(f"batch has width {width}, the statistics have {self.gram.shape[0] - 1}")
        sums = rows.sum(axis=0)
        self.gram[:width, :width] += rows.T @ rows
        self.gram[:width, width] += sums
        self.gram[width, :width] += sums
        self.gram[width, width] += rows.shape[0]
        self.count += rows.shape[0]

    def result(self) -> np.ndarray | None:
        """(D+1, D+1), or None if nothing was added."""
        return self.gram


@dataclasses.dataclass
class JointFit:
    kept: np.ndarray  # sorted int64 indices of the kept neurons, length k
    down_matrix: np.ndarray  # (k·block, d2), float64 (the kept neurons' rows, in order)
    down_bias: np.ndarray | None  # (d2,), float64 (None when the down layer has no bias)
    relative_error: float


def _problem(down_matrix, down_bias, correlation, ridge_scale) -> tuple[np.ndarray, np.ndarray, float]:
    """W̃ and C restricted to the columns that take part (the constant one only with a bias), and λ."""
    matrix = np.asarray(down_matrix, dtype=np.float64)
    width = matrix.shape[0]
    corr = np.asarray(correlation, dtype=np.float64)
    if corr.shape != (width + 1, width + 1):
        raise ValueError(f"correlation is {corr.shape}, expected {(width + 1, width + 1)}")
    if ridge_scale < 0:
        raise ValueError("ridge_scale must be >= 0")
    if down_bias is not None:
        bias = np.asarray(down_bias, dtype=np.float64).reshape(1, matrix.shape[1])
        weights = np.vstack([matrix, bias])
    else:
        weights, corr = matrix, corr[:width, :width]
    scale = float(np.mean(np.diag(corr)[:width])) if width else 0.0
    ridge = ridge_scale * scale
    return weights, corr, ridge if np.isfinite(ridge) and ridge > 0 else _TINY_RIDGE


def _neurons(rows: int, block: int) -> int:
    """The number of neurons of a down matrix with `rows` rows, `block` rows a neuron."""
    if block < 1 or rows % block:
        raise ValueError(f"the down matrix's {rows} rows are not whole blocks of {block}")
    return rows // block


def _rows(kept: np.ndarray, block: int) -> np.ndarray:
    """The rows of W̃ (and C) the kept neurons own."""
    return kept if block == 1 else (kept[:, None] * block + np.arange(block)).reshape(-1)


def _regularized(corr: np.ndarray, ridge: float) -> np.ndarray:
    return corr + ridge * np.eye(len(corr))


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    try:
        factor = scipy.linalg.cho_factor(matrix, lower=True)
        return scipy.linalg.cho_solve(factor, np.eye(len(matrix)))
    except np.linalg.LinAlgError:
        return np.linalg.pinv(matrix, hermitian=True)


def _spd_solve(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(matrix, lower=True), rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def obs_scores(down_matrix: np.ndarray, down_bias: np.ndarray | None, correlation: np.ndarray,
               ridge_scale: float = 1e-6, block: int = 1) -> np.ndarray:
    """(D,) one-shot OBS scores s_j = ||W̃[j]||² / [(C + λI)⁻¹]_jj: the error of dropping j alone
    (for blocks, tr(W̃_Jᵀ ([H⁻¹]_JJ)⁻¹ W̃_J))."""
    weights, corr, ridge = _problem(down_matrix, down_bias, correlation, ridge_scale)
    rows = np.shape(down_matrix)[0]
    width = _neurons(rows, block)
    inverse = _spd_inverse(_regularized(corr, ridge))
    if block == 1:
        return np.sum(weights[:width] ** 2, axis=1) / np.diag(inverse)[:width]
    return _block_scores(weights[:rows].reshape(width, block, -1), _diagonal_blocks(inverse, width, block))


def _diagonal_blocks(inverse: np.ndarray, width: int, block: int) -> np.ndarray:
    """(D, block, block): the neurons' diagonal blocks [H⁻¹]_JJ."""
    rows = width * block
    grid = inverse[:rows, :rows].reshape(width, block, width, block)
    index = np.arange(width)
    return grid[index, :, index, :]


def _block_scores(grouped: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """(m,) tr(W̃_Jᵀ [H⁻¹]_JJ⁺ W̃_J) for m neurons' rows (m, block, d2) and diagonal blocks (m, block, block)."""
    return np.sum(grouped * (np.linalg.pinv(blocks, hermitian=True) @ grouped), axis=(1, 2))


def _elimination_order(weights: np.ndarray, corr: np.ndarray, ridge: float, width: int, drops: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The first `drops` neurons removed by greedy OBS, in order, and the loss each drop added.

    Each drop's score is exactly the increase of tr(RᵀHR) (H = C + λI) when the neuron goes and the
    ones left are refitted, so the running sum of the scores is the loss after each drop.

    Dropping j with the others refitted updates H⁻¹ -= u uᵀ and W̃ -= u vᵀ (u = H⁻¹[:, j]/√d,
    v = W̃[j]/√d, d = H⁻¹_jj). Only G = W̃W̃ᵀ is tracked (G -= u qᵀ + q uᵀ, q = G[:, j]/√d − (G_jj/2d)·u),
    and the updates are held as columns of U and Q and applied in blocks.
    """
    inverse = _spd_inverse(_regularized(corr, ridge))
    outer = weights @ weights.T
    inv_diag, out_diag = np.diag(inverse).copy(), np.diag(outer).copy()
    alive = np.ones(width, dtype=bool)
    pending_u, pending_q = np.zeros((len(corr), _FLUSH)), np.zeros((len(corr), _FLUSH))
    order, added, held = [], [], 0
    for _ in range(drops):
        scores = np.maximum(out_diag[:width], 0.0) / np.where(alive, np.maximum(inv_diag[:width], 1e-300), 1.0)
        scores[~alive] = np.inf
        j = width - 1 - int(np.argmin(scores[::-1]))  # ties: the higher index is dropped, the lower kept
        u, q = pending_u[:, :held], pending_q[:, :held]
        column = inverse[:, j] - u @ u[j]
        g_column = outer[:, j] - u @ q[j] - q @ u[j]
        pivot = max(column[j], 1e-300)
        u_new = column / np.sqrt(pivot)
        q_new = g_column / np.sqrt(pivot) - (g_column[j] / (2 * pivot)) * u_new
        inv_diag -= u_new**2
        out_diag -= 2 * u_new * q_new
        pending_u[:, held], pending_q[:, held] = u_new, q_new
        held += 1
        alive[j] = False
        order.append(j)
        added.append(scores[j])
        if held == _FLUSH:
            inverse -= pending_u @ pending_u.T
            outer -= pending_u @ pending_q.T + pending_q @ pending_u.T
            held = 0
    return np.asarray(order, dtype=np.int64), np.asarray(added, dtype=np.float64)


def _block_elimination_order(weights: np.ndarray, corr: np.ndarray, ridge: float, width: int, block: int,
                             drops: int) -> tuple[np.ndarray, np.ndarray]:
    """_elimination_order for neurons of `block` rows (see the module docstring for the update).

    W̃ and the diagonal blocks of H⁻¹ are kept up to date; H⁻¹ itself only through its pending
    downdates U (H⁻¹ = inverse − U Uᵀ), applied together once they reach _FLUSH columns.
    """
    inverse = _spd_inverse(_regularized(corr, ridge))
    weights = weights.copy()
    rows = width * block
    blocks = _diagonal_blocks(inverse, width, block)
    alive = np.ones(width, dtype=bool)
    pending = np.zeros((len(corr), max(_FLUSH, block)))
    order, added, held = [], [], 0
    for _ in range(drops):
        live = np.flatnonzero(alive)
        scores = np.full(width, np.inf)
        scores[live] = _block_scores(weights[:rows].reshape(width, block, -1)[live], blocks[live])
        j = width - 1 - int(np.argmin(scores[::-1]))  # ties: the higher index is dropped, the lower kept
        own = slice(j * block, (j + 1) * block)
        columns = inverse[:, own] - pending[:, :held] @ pending[own, :held].T
        root = _inverse_root(columns[own])  # root·rootᵀ = [H⁻¹]_JJ⁺
        update = columns @ root  # H⁻¹ −= update·updateᵀ
        weights -= update @ (root.T @ weights[own])
        grouped = update[:rows].reshape(width, block, block)
        blocks -= grouped @ grouped.transpose(0, 2, 1)
        if held + block > pending.shape[1]:
            inverse -= pending[:, :held] @ pending[:, :held].T
            held = 0
        pending[:, held:held + block] = update
        held += block
        alive[j] = False
        order.append(j)
        added.append(scores[j])
    return np.asarray(order, dtype=np.int64), np.asarray(added, dtype=np.float64)


def _inverse_root(matrix: np.ndarray) -> np.ndarray:
    """R with R·Rᵀ the pseudo-inverse of a symmetric positive semi-definite block."""
    values, vectors = np.linalg.eigh(matrix)
    cutoff = max(float(values[-1]), 0.0) * len(values) * np.finfo(np.float64).eps
    scale = np.zeros_like(values)
    scale[values > cutoff] = values[values > cutoff] ** -0.5
    return vectors * scale


def _order(weights, corr, ridge, width: int, block: int, drops: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy OBS elimination order and each drop's added loss (the scalar path for block 1)."""
    if not drops:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if block == 1:
        return _elimination_order(weights, corr, ridge, width, drops)
    return _block_elimination_order(weights, corr, ridge, width, block, drops)


def _refit(weights: np.ndarray, corr: np.ndarray, ridge: float, width: int, kept: np.ndarray,
           has_bias: bool) -> tuple[np.ndarray, float]:
    """The least-squares rows for T = kept rows (+ the constant column, row `width`), and the relative error."""
    rows = np.append(kept, width) if has_bias else kept
    fitted = _spd_solve(_regularized(corr[np.ix_(rows, rows)], ridge), corr[rows] @ weights)
    residual = weights.copy()
    residual[rows] -= fitted
    total = float(np.sum(weights * (corr @ weights)))
    lost = float(np.sum(residual * (corr @ residual)))
    return fitted, max(lost, 0.0) / total if total > 0 else 0.0


def _fit_from_order(down_matrix, down_bias, weights, corr, ridge, order: np.ndarray, keep: int,
                    block: int) -> JointFit:
    rows = weights.shape[0] - (down_bias is not None)
    width = rows // block
    if keep == width:
        bias = None if down_bias is None else np.asarray(down_bias, dtype=np.float64).copy()
        return JointFit(np.arange(width, dtype=np.int64), np.asarray(down_matrix, dtype=np.float64).copy(), bias, 0.0)
    kept = np.setdiff1d(np.arange(width, dtype=np.int64), order[: width - keep])
    fitted, error = _refit(weights, corr, ridge, rows, _rows(kept, block), down_bias is not None)
    bias = fitted[keep * block] if down_bias is not None else None
    return JointFit(kept, fitted[: keep * block], bias, error)


def _check_keeps(keeps: Sequence[int], width: int) -> list[int]:
    keeps = [int(k) for k in keeps]
    if any(not 1 <= k <= width for k in keeps):
        raise ValueError(f"keep must be within 1..{width}, got {keeps}")
    return keeps


def select_and_refit(down_matrix: np.ndarray, down_bias: np.ndarray | None, correlation: np.ndarray, keep: int,
                     ridge_scale: float = 1e-6, block: int = 1) -> JointFit:
    """Keep `keep` neurons (of `block` rows each) chosen by greedy OBS elimination and refit the down layer on them."""
    return _fits(down_matrix, down_bias, correlation, [keep], ridge_scale, block)[0]


def _fits(down_matrix, down_bias, correlation, keeps: Sequence[int], ridge_scale: float, block: int
          ) -> list[JointFit]:
    weights, corr, ridge = _problem(down_matrix, down_bias, correlation, ridge_scale)
    width = _neurons(np.shape(down_matrix)[0], block)
    keeps = _check_keeps(keeps, width)
    order = _order(weights, corr, ridge, width, block, width - min(keeps, default=width))[0]
    return [_fit_from_order(down_matrix, down_bias, weights, corr, ridge, order, k, block) for k in keeps]


@dataclasses.dataclass
class Elimination:
    """One greedy OBS elimination of a pair down to one neuron: every k's error, and its fit on demand.

    `error(k)` is read off the elimination (the running sum of the drops' scores, relative to
    tr(W̃ᵀCW̃)) without a solve, so a planner can price every k; `fit(k)` solves for the one it takes.
    """

    down_matrix: np.ndarray
    down_bias: np.ndarray | None
    weights: np.ndarray
    corr: np.ndarray
    ridge: float
    order: np.ndarray  # the D - 1 neurons dropped, first dropped first
    lost: np.ndarray  # (D,): lost[d] is the relative error once d neurons are dropped (lost[0] = 0)
    plain_share: float  # ||Z·W2||² / ||Z·W2 + b2||²: converts the error to the down layer's unbiased output
    block: int = 1  # rows of the down matrix per neuron

    @property
    def width(self) -> int:
        return int(np.shape(self.down_matrix)[0]) // self.block

    def error(self, keep: int) -> float:
        return float(self.lost[self.width - _check_keeps([keep], self.width)[0]])

    def fit(self, keep: int) -> JointFit:
        _check_keeps([keep], self.width)
        return _fit_from_order(self.down_matrix, self.down_bias, self.weights, self.corr, self.ridge, self.order, keep,
                               self.block)


def eliminate(down_matrix: np.ndarray, down_bias: np.ndarray | None, correlation: np.ndarray,
              ridge_scale: float = 1e-6, block: int = 1) -> Elimination:
    """Greedy OBS elimination of all but one neuron (the selection select_and_refit makes, for every k)."""
    weights, corr, ridge = _problem(down_matrix, down_bias, correlation, ridge_scale)
    rows = int(np.shape(down_matrix)[0])
    width = _neurons(rows, block)
    order, added = _order(weights, corr, ridge, width, block, max(width - 1, 0))
    total = float(np.sum(weights * (corr @ weights)))
    lost = np.concatenate([[0.0], np.maximum.accumulate(np.cumsum(added))]) / total if total > 0 else np.zeros(width)
    plain = np.asarray(down_matrix, dtype=np.float64)
    plain_total = float(np.sum(plain * (corr[:rows, :rows] @ plain)))
    return Elimination(np.asarray(down_matrix), down_bias, weights, corr, ridge, order, lost,
                       plain_total / total if total > 0 else 1.0, block)


def pair_params(d_in: int, width: int, d_out: int, keep: int, up_bias: bool, down_bias: bool) -> int:
    """Parameters of the pair with `keep` of its `width` neurons: k·d_in (+k) + k·d_out (+d_out)."""
    return keep * (d_in + int(up_bias) + d_out) + (d_out if down_bias else 0)


def keep_for_params(d_in: int, width: int, d_out: int, params: int, up_bias: bool, down_bias: bool) -> int:
    """The largest k in 1..width with pair_params(k) <= params (1 when even that is over)."""
    fixed = d_out if down_bias else 0
    per_neuron = d_in + int(up_bias) + d_out
    return int(min(width, max(1, (params - fixed) // per_neuron)))
