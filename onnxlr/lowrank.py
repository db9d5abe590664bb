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
