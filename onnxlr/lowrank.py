"""The linear algebra: truncated SVD of (batches of) matrices and the rank rules.

Nothing here knows about ONNX. A weight arrives as a stack of matrices of shape (groups, m, n)
(one matrix per convolution group; groups == 1 otherwise) and leaves as two factor stacks
A (groups, m, r) and B (groups, r, n) with A @ B ~= W.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

# Above this many elements per matrix the SVD runs in float32 to bound time and memory.
FLOAT64_MAX_ELEMENTS = 1 << 24


@dataclasses.dataclass
class Decomposition:
    """SVD of a stack of matrices: W[g] = U[g] @ diag(S[g]) @ Vt[g]."""

    u: np.ndarray  # (groups, m, k)
    s: np.ndarray  # (groups, k), descending
    vt: np.ndarray  # (groups, k, n)
    method: str = "svd"  # "whitened" / "compensated": s is the spectrum of the activation-weighted matrix

    @property
    def full_rank(self) -> int:
        return self.s.shape[1]

    @property
    def total_energy(self) -> float:
        return float(np.sum(self.s.astype(np.float64) ** 2))

    def retained_energy(self, rank: int) -> float:
        """Fraction of the squared singular values kept at `rank` (1.0 for a zero matrix)."""
        total = self.total_energy
        if total == 0.0:
            return 1.0
        return float(np.sum(self.s[:, :rank].astype(np.float64) ** 2) / total)

    def cumulative_energy(self) -> np.ndarray:
        """retained_energy(r) for r = 1..full_rank, as one array."""
        total = self.total_energy
        per_rank = np.sum(self.s.astype(np.float64) ** 2, axis=0)
        if total == 0.0:
            return np.ones_like(per_rank)
        return np.cumsum(per_rank) / total

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Balanced factors A = U sqrt(S), B = sqrt(S) Vt, truncated to `rank`."""
        root = np.sqrt(self.s[:, :rank])
        a = self.u[:, :, :rank] * root[:, None, :]
        b = root[:, :, None] * self.vt[:, :rank, :]
        return a, b


def svd(matrices: np.ndarray) -> Decomposition:
    """Thin SVD of a (groups, m, n) stack, in float64 unless the matrices are huge.

    LAPACK's divide-and-conquer driver (gesdd) occasionally fails to converge; scipy's gesvd is
    the slower, more robust fallback.
    """
    if matrices.ndim != 3:
        raise ValueError(f"expected a (groups, m, n) stack, got shape {matrices.shape}")
    compute_dtype = np.float64 if matrices.shape[1] * matrices.shape[2] <= FLOAT64_MAX_ELEMENTS else np.float32
    work = np.asarray(matrices, dtype=compute_dtype)
    try:
        u, s, vt = np.linalg.svd(work, full_matrices=False)
    except np.linalg.LinAlgError:
        import scipy.linalg

        logger.info("gesdd did not converge; retrying with gesvd")
        parts = [scipy.linalg.svd(m, full_matrices=False, lapack_driver="gesvd") for m in work]
        u, s, vt = (np.stack(x) for x in zip(*parts))
    return Decomposition(u=u, s=s, vt=vt)


# ----------------------------------------------------------------------------- activation-whitened SVD

DEFAULT_DAMPING = 1e-6
# Cholesky pivots spanning more than this (squared) ratio mean a root too ill-conditioned to invert safely.
MAX_CONDITION = 1e12


def whitened_svd(matrices: np.ndarray, gram: np.ndarray, damping: float = DEFAULT_DAMPING,
                 side: str = "rows", cross: np.ndarray | None = None) -> Decomposition:
    """SVD that minimizes the error on the calibration activations instead of on the weight (SVD-LLM).

    `gram` (K, K), or (groups, K, K) with one per matrix, is the second moment sum x x^T of the
    vectors the weight multiplies. With side="rows" the weight is applied as x^T W (K = m: MatMul
    right, Gemm B); with side="cols" as W x (K = n: MatMul left, Gemm A, Conv patches). For
    G = S S^T, ||X (W - A B)|| = ||S^T (W - A B)||, so the best rank-r pair is the truncated SVD
    of S^T W, un-whitened: A = S^-T U sqrt(s), B = sqrt(s) Vt. The result's s is that whitened
    spectrum, so energy rules measure the output error.

    Error compensation: with `cross` C = sum x_c x_o^T, where x_c is the input the layer sees in the
    partially compressed model and x_o the original input, the pair minimizes ||X_c A B - X_o W||
    instead (G is then the Gram of x_c): the truncated SVD of S^-1 C W, un-whitened the same way.
    """
    if side not in ("rows", "cols"):
        raise ValueError(f"side must be rows or cols, got {side!r}")
    work = matrices if side == "rows" else np.swapaxes(matrices, 1, 2)
    groups, size = work.shape[0], work.shape[1]
    grams = _per_group(gram, groups, size, "gram")
    crosses = _per_group(cross, groups, size, "cross") if cross is not None else None
    us, ss, vts = [], [], []
    for index in range(groups):
        g = np.asarray(grams[index], dtype=np.float64)
        scale = float(np.mean(np.diag(g))) if size else 0.0
        weight = np.asarray(work[index], dtype=np.float64)
        if not np.isfinite(scale) or scale <= 0.0:  # all-zero activations carry no information
            inner = svd(weight[None])
            us.append(inner.u[0]), ss.append(inner.s[0]), vts.append(inner.vt[0])
            continue
        root, inverse_t = _gram_root(g, damping * scale)
        if crosses is None:
            target = root.T @ weight
        else:  # S^-1 C W, with S^-1 = (S^-T)^T
            target = inverse_t.T @ (np.asarray(crosses[index], dtype=np.float64) @ weight)
        inner = svd(target[None])
        us.append(inverse_t @ inner.u[0])  # un-whiten: A = S^-T U (the sqrt(s) split stays in factors())
        ss.append(inner.s[0])
        vts.append(inner.vt[0])
    u, s, vt = np.stack(us), np.stack(ss), np.stack(vts)
    method = "whitened" if cross is None else "compensated"
    if side == "rows":
        return Decomposition(u=u, s=s, vt=vt, method=method)
    # W^T ~= (S^-T U) diag(s) Vt, hence W ~= V diag(s) (S^-T U)^T.
    return Decomposition(u=np.swapaxes(vt, 1, 2), s=s, vt=np.swapaxes(u, 1, 2), method=method)


def _per_group(matrix: np.ndarray, groups: int, size: int, what: str) -> np.ndarray:
    """A (K, K) matrix shared by every group, or one (groups, K, K) stack, as a stack."""
    matrix = np.asarray(matrix)
    stack = matrix[None] if matrix.ndim == 2 else matrix
    if stack.shape[1:] != (size, size) or len(stack) not in (1, groups):
        raise ValueError(f"{what} of shape {matrix.shape} does not fit the weight's input side {size} "
                         f"({groups} group(s))")
    return np.broadcast_to(stack, (groups, size, size))


def _gram_root(gram: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """S with S S^T = G + damping I, and S^-T: Cholesky, or eigenvalues clipped when that is unsafe."""
    import scipy.linalg

    size = gram.shape[0]
    identity = np.eye(size)
    try:
        lower = np.linalg.cholesky(gram + damping * identity)
        pivots = np.diag(lower)
        if np.all(np.isfinite(lower)) and pivots.min() > 0 and (pivots.max() / pivots.min()) ** 2 <= MAX_CONDITION:
            inverse = scipy.linalg.solve_triangular(lower, identity, lower=True)
            return lower, inverse.T
    except np.linalg.LinAlgError:
        pass
    logger.info("Gram matrix is ill-conditioned; whitening with clipped eigenvalues")
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    # Clip at the damping, and at a floor relative to the largest eigenvalue so S stays invertible.
    floor = max(damping, float(values.max()) / MAX_CONDITION, np.finfo(np.float64).tiny)
    roots = np.sqrt(np.clip(values, floor, None))
    return vectors * roots[None, :], vectors / roots[None, :]


# ----------------------------------------------------------------------------- rank rules


def rank_for_ratio(ratio: float, full_rank: int) -> int:
    return max(1, min(full_rank, math.ceil(ratio * full_rank - 1e-9)))


def rank_for_energy(decomposition: Decomposition, energy: float) -> int:
    """Smallest rank whose retained energy is >= `energy`."""
    curve = decomposition.cumulative_energy()
    index = int(np.searchsorted(curve, energy - 1e-12, side="left"))
    return max(1, min(decomposition.full_rank, index + 1))


def rank_for_param_ratio(ratio: float, params_before: int, params_per_rank: int, full_rank: int) -> int:
    """Largest rank whose factor pair holds <= ratio x the original parameters (at least 1)."""
    return max(1, min(full_rank, math.floor(ratio * params_before / params_per_rank + 1e-9)))


def round_to_multiple(rank: int, multiple: int, limit: int) -> int:
    """Round `rank` up to a multiple of `multiple` unless that would reach `limit` (break-even or full rank)."""
    if multiple <= 1:
        return rank
    up = math.ceil(rank / multiple) * multiple
    return up if up < limit else rank
