"""The linear algebra: truncated SVD of (batches of) matrices and the rank rules.

Nothing here knows about ONNX. A weight arrives as a stack of matrices of shape (groups, m, n)
(one matrix per convolution group; groups == 1 otherwise) and leaves as two factor stacks
A (groups, m, r) and B (groups, r, n) with A @ B ~= W.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)

# Above this many elements per matrix the SVD runs in float32 to bound time and memory.
FLOAT64_MAX_ELEMENTS = 1 << 24

SVD_METHODS = ("auto", "exact", "randomized")
DEVICES = ("cpu", "cuda")
# --svd auto takes the randomized SVD only for matrices whose smaller side is at least this long
# (below it LAPACK is fast anyway) and when rank + oversampling is at most this fraction of that side
# (a larger rank gains little time and would no longer be close to exact).
AUTO_MIN_SIDE = 512
AUTO_MAX_RANK_FRACTION = 0.5
# Subspace (power) iterations of the randomized SVD: each one costs two products with the matrix and
# sharpens the leading singular vectors where the spectrum decays slowly (Halko et al. 2011, sec. 4.5).
POWER_ITERATIONS = 2
RANDOMIZED_SEED = 0  # the Gaussian test matrix is seeded: the same input gives the same factors
# The tail check computes the exact singular values (no vectors) of matrices up to this many elements.
CHECK_MAX_ELEMENTS = 1 << 20
# --svd auto falls back to the exact SVD when the randomized residual energy exceeds the optimal
# residual (the exact tail) by more than this fraction.
MAX_TAIL_EXCESS = 0.01
# A residual below this fraction of the matrix energy counts as zero (float rounding, not an error).
RESIDUAL_FLOOR = 1e-6


@dataclasses.dataclass
class Decomposition:
    """SVD of a stack of matrices: W[g] = U[g] @ diag(S[g]) @ Vt[g]."""

    u: np.ndarray | None  # (groups, m, k); None once the factors were taken (drop_vectors)
    s: np.ndarray  # (groups, k), descending
    vt: np.ndarray | None  # (groups, k, n)
    method: str = "svd"  # "whitened" / "compensated": s is the spectrum of the activation-weighted matrix
    # Energy (sum of squares) of the whole matrix stack when s holds only the leading values (randomized).
    total: float | None = None
    solver: str = "exact"  # "exact", "randomized", or "exact (fallback)" after a failed tail check
    tail_excess: float | None = None  # randomized residual energy / exact tail - 1, when checked

    @property
    def full_rank(self) -> int:
        return self.s.shape[1]

    @property
    def partial(self) -> bool:
        """True when only the leading singular values are known (the spectrum's tail is not)."""
        return self.total is not None

    @property
    def total_energy(self) -> float:
        if self.total is not None:
            return self.total
        return float(np.sum(self.s.astype(np.float64) ** 2))

    def drop_vectors(self) -> None:
        """Free U and Vt once the factors were written; the spectrum stays for the report."""
        self.u = self.vt = None

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
        if self.u is None or self.vt is None:
            raise ValueError("the singular vectors were dropped; factors are no longer available")
        if rank > self.full_rank:
            raise ValueError(f"rank {rank} exceeds the {self.full_rank} singular triplets computed")
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


# ----------------------------------------------------------------------------- SVD backends


@dataclasses.dataclass(frozen=True)
class Solver:
    """Which SVD to run (`--svd`) and where (`--device`)."""

    svd: str = "exact"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.svd not in SVD_METHODS:
            raise OnnxlrError(f"svd must be one of {', '.join(SVD_METHODS)}; got {self.svd!r}")
        if self.device not in DEVICES:
            raise OnnxlrError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS and LAPACK on one thread while the SVDs run.

    OpenBLAS's results depend on its thread count (even sgemm's), so pinning it makes the factors
    independent of --jobs and of the machine's core count; --jobs brings the parallelism back, one
    layer per thread. Small LAPACK calls (Cholesky, eigh) also run much faster without thread sync.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency; without it the BLAS library's default applies
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def check_device(device: str) -> None:
    """Refuse --device cuda early, with one line, when torch or a CUDA GPU is missing."""
    if device != "cuda":
        return
    try:
        import torch
    except ImportError:
        raise OnnxlrError("{0} cuda needs PyTorch with CUDA: pip install 'onnxlr[torch]' "
                          "(a CUDA build of torch) on a machine with an NVIDIA GPU", "device") from None
    if not torch.cuda.is_available():
        raise OnnxlrError(f"{{0}} cuda: torch {torch.__version__} sees no CUDA GPU "
                          "(a CPU-only build, or no driver); use {0} cpu", "device")


def oversampling(rank: int) -> int:
    """Extra columns of the randomized sketch beyond the rank (Halko et al. recommend 5-10 at least)."""
    return max(10, math.ceil(0.1 * rank))


def choose_solver(shape: tuple[int, ...], rank: int | None, svd: str) -> str:
    """"exact" or "randomized" for a (groups, m, n) stack truncated to `rank` (None: whole spectrum)."""
    side = min(shape[-2], shape[-1])
    if svd == "exact" or rank is None:
        return "exact"
    sketch = rank + oversampling(rank)
    if svd == "randomized":
        return "randomized" if sketch < side else "exact"  # the sketch would be the whole matrix
    return "randomized" if side >= AUTO_MIN_SIDE and sketch <= AUTO_MAX_RANK_FRACTION * side else "exact"


def working_set_bytes(shape: tuple[int, ...], rank: int | None, svd_method: str) -> int:
    """Rough upper estimate of the memory one decomposition of a (groups, m, n) stack takes (for --jobs)."""
    groups, m, n = shape
    if rank is not None and choose_solver(shape, rank, svd_method) == "randomized":
        sketch = rank + oversampling(rank)
        return groups * 4 * (m * n + 4 * sketch * (m + n))  # a float32 copy at most, and the sketches
    itemsize = 8 if m * n <= FLOAT64_MAX_ELEMENTS else 4
    return groups * itemsize * 3 * m * n  # the working copy, U and Vt, LAPACK's workspace


def decompose(matrices: np.ndarray, rank: int | None = None, solver: Solver = Solver()) -> Decomposition:
    """SVD of a (groups, m, n) stack by the solver's rules; with `rank`, only that many triplets may be kept.

    The randomized result is checked against the exact tail where that is affordable; under
    --svd auto a result more than MAX_TAIL_EXCESS off is replaced by the exact SVD.
    """
    if matrices.ndim != 3:
        raise ValueError(f"expected a (groups, m, n) stack, got shape {matrices.shape}")
    if choose_solver(matrices.shape, rank, solver.svd) == "exact":
        return svd(matrices) if solver.device == "cpu" else _exact_torch(matrices, solver.device)
    assert rank is not None
    result = randomized_svd(matrices, rank, device=solver.device)
    if matrices.shape[1] * matrices.shape[2] <= CHECK_MAX_ELEMENTS:
        result.tail_excess = tail_excess(matrices, result, rank)
        if solver.svd == "auto" and result.tail_excess > MAX_TAIL_EXCESS:
            logger.info("randomized SVD residual %.1f%% above the exact tail; using the exact SVD",
                        100 * result.tail_excess)
            exact = svd(matrices) if solver.device == "cpu" else _exact_torch(matrices, solver.device)
            exact.solver = "exact (fallback)"
            return exact
    return result


def randomized_svd(matrices: np.ndarray, rank: int, device: str = "cpu", seed: int = RANDOMIZED_SEED,
                   power_iterations: int = POWER_ITERATIONS) -> Decomposition:
    """Leading `rank` singular triplets of each matrix by randomized range finding (Halko et al. 2011).

    Work is in float32 (float64 for float64 weights): the factors are cast to the weight's dtype
    anyway. The residual energy of the result is exact: total - sum(s^2), since U U^T W is a projection.
    """
    dtype = np.float64 if matrices.dtype == np.float64 else np.float32
    ops = _NumpyOps() if device == "cpu" else _TorchOps(device)
    sketch = min(rank + oversampling(rank), min(matrices.shape[1:]))
    parts, total = [], 0.0
    for matrix in matrices:
        work = np.asarray(matrix, dtype=dtype)  # no copy for float32 weights (a view of the mapped file)
        parts.append(_randomized_one(ops, work, rank, sketch, seed, power_iterations))
        total += frobenius_energy(work)
    u, s, vt = (np.stack(x) for x in zip(*parts))
    return Decomposition(u=u, s=s, vt=vt, total=total, solver="randomized")


def _randomized_one(ops: Any, matrix: np.ndarray, rank: int, sketch: int, seed: int, power_iterations: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The test matrix comes from numpy on every device, so CPU and GPU runs start from the same sketch.
    omega = np.random.default_rng(seed).standard_normal((matrix.shape[1], sketch), dtype=np.float32)
    w, omega = ops.asarray(matrix), ops.asarray(omega.astype(matrix.dtype, copy=False))
    y = w @ omega
    del omega  # n x sketch, as large as the biggest temporaries below: lm_head's peak was 144 MB higher with it
    for _ in range(power_iterations):
        # Re-normalizing between products keeps the small singular directions from underflowing.
        y = w @ ops.normalize(w.T @ ops.normalize(y))
    q = ops.orthonormalize(y)
    u_small, s, vt = ops.svd_wide(q.T @ w)
    u = q @ u_small[:, :rank]
    return ops.numpy(u), ops.numpy(s[:rank]), ops.numpy(vt[:rank])


def frobenius_energy(matrix: np.ndarray) -> float:
    """Sum of squares of a matrix, accumulated in float64 a block of rows at a time (no float64 copy)."""
    total = 0.0
    for rows in np.array_split(matrix, max(1, matrix.size // (1 << 22)), axis=0):
        total += float(np.einsum("ij,ij->", rows, rows, dtype=np.float64))
    return total


def tail_excess(matrices: np.ndarray, decomposition: Decomposition, rank: int) -> float:
    """How much more residual energy the rank-`rank` result leaves than the exact truncation: achieved / optimal - 1."""
    exact = np.linalg.svd(np.asarray(matrices, dtype=np.float64), compute_uv=False)
    total = float(np.sum(exact**2))
    floor = RESIDUAL_FLOOR * total
    optimal = max(total - float(np.sum(exact[:, :rank] ** 2)), floor)
    achieved = max(decomposition.total_energy - float(np.sum(decomposition.s[:, :rank].astype(np.float64) ** 2)),
                   floor)
    return max(0.0, achieved / optimal - 1.0)


class _NumpyOps:
    """The randomized steps on the CPU, built from matrix products wherever possible.

    Householder QR and triangular solves are slow next to products (and under load OpenBLAS's
    threaded QR ran 10-20x slower still); Cholesky QR gets the same basis from two products and a
    small k x k factorization, with Householder QR as the fallback when the sketch is too
    ill-conditioned for it (a matrix of lower rank than the sketch).
    """

    @staticmethod
    def asarray(array: np.ndarray) -> np.ndarray:
        return array

    @staticmethod
    def numpy(array: np.ndarray) -> np.ndarray:
        return array

    @staticmethod
    def normalize(y: np.ndarray) -> np.ndarray:
        """Well-conditioned columns spanning the same space (between power iterations)."""
        q = _cholesky_qr(y)
        return q if q is not None else _householder_q(y)

    @staticmethod
    def orthonormalize(y: np.ndarray) -> np.ndarray:
        """An orthonormal basis of y's columns: Cholesky QR twice (CholeskyQR2)."""
        q = _cholesky_qr(y)
        q = _cholesky_qr(q) if q is not None else None
        return q if q is not None else _householder_q(y)

    @staticmethod
    def svd_wide(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SVD of a short, wide k x n matrix from the eigenvectors of b b^T (k x k, eigh in float64).

        b = U S Vt with U the eigenvectors and S the roots of the eigenvalues, so Vt = S^-1 U^T b; the
        product U S Vt is then U U^T b = b, even where a tiny singular value makes a row of Vt
        inaccurate (that row carries a tiny weight in the factors).
        """
        values, vectors = np.linalg.eigh((b @ b.T).astype(np.float64))
        values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]  # descending
        s = np.sqrt(values)
        keep = s > (s[0] if len(s) else 0.0) * 1e-6  # rows for (numerically) zero values stay zero
        scale = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
        u = vectors.astype(b.dtype)
        vt = (u * scale[None, :].astype(b.dtype)).T @ b  # S^-1 U^T b with one k x n array, not two
        return u, s.astype(b.dtype), vt


def _cholesky_qr(y: np.ndarray) -> np.ndarray | None:
    """Q = y R^-1 with R^T R = y^T y, or None when y is too ill-conditioned for the Gram matrix."""
    import scipy.linalg

    gram = (y.T @ y).astype(np.float64)  # k x k: the product in y's precision, the factorization in float64
    try:
        lower = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        return None
    pivots = np.diag(lower)  # about the singular values of y
    # Past this spread the Gram matrix (condition squared) has lost y's smallest directions.
    if not np.all(np.isfinite(pivots)) or pivots.min() <= pivots.max() * 10 * np.sqrt(np.finfo(y.dtype).eps):
        return None
    inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
    if info != 0:
        return None
    return y @ inverse.T.astype(y.dtype)  # y L^-T: a product, much faster than a triangular solve on y


def _householder_q(y: np.ndarray) -> np.ndarray:
    import scipy.linalg

    return scipy.linalg.qr(y, mode="economic", check_finite=False)[0]


class _TorchOps:
    """The same steps with torch on a GPU (QR throughout: cheap there)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.device = torch, device

    def asarray(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def numpy(self, tensor: Any) -> np.ndarray:
        return tensor.cpu().numpy()

    def normalize(self, y: Any) -> Any:
        return self.torch.linalg.qr(y).Q

    def orthonormalize(self, y: Any) -> Any:
        return self.torch.linalg.qr(y).Q

    def svd_wide(self, b: Any) -> tuple[Any, Any, Any]:
        return self.torch.linalg.svd(b, full_matrices=False)


def _exact_torch(matrices: np.ndarray, device: str) -> Decomposition:
    """torch.linalg.svd on the GPU, with the same float64 / float32 rule as the CPU path."""
    import torch

    compute_dtype = np.float64 if matrices.shape[1] * matrices.shape[2] <= FLOAT64_MAX_ELEMENTS else np.float32
    work = torch.from_numpy(np.ascontiguousarray(matrices, dtype=compute_dtype)).to(device)
    u, s, vt = torch.linalg.svd(work, full_matrices=False)
    return Decomposition(u=u.cpu().numpy(), s=s.cpu().numpy(), vt=vt.cpu().numpy())

# ----------------------------------------------------------------------------- activation-whitened SVD

DEFAULT_DAMPING = 1e-6
# Cholesky pivots spanning more than this (squared) ratio mean a root too ill-conditioned to invert safely.
MAX_CONDITION = 1e12


@dataclasses.dataclass
class SampleGram:
    """A Gram G = XᵀX kept as its vectors X (n x K) because they are fewer than their width K.

    A wide layer calibrated on a few samples (an 8B model's 14336-wide down projection on 256 tokens) then takes
    n x K numbers instead of K x K, and is whitened in the span of its samples (whitened_svd). `blocks` (each
    (n_i, K), any float dtype) may be memory maps: block-by-block calibration spills them to disk.
    """

    blocks: list[np.ndarray]
    ndim = 2

    @property
    def width(self) -> int:
        return int(self.blocks[0].shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.width, self.width)

    @property
    def count(self) -> int:
        return sum(len(block) for block in self.blocks)

    def vectors(self) -> np.ndarray:
        """X, (n, K) float64."""
        return np.concatenate([np.asarray(block, dtype=np.float64) for block in self.blocks])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The K x K Gram itself, for steps that need the matrix (joint pairs' augmented statistics)."""
        vectors = self.vectors()
        gram = vectors.T @ vectors
        return gram if dtype is None else gram.astype(dtype)


def summed_grams(grams: list) -> Any:
    """The Gram of several readers' inputs together: their vectors side by side when all are SampleGrams."""
    if len(grams) == 1:
        return grams[0]
    if all(isinstance(gram, SampleGram) for gram in grams):
        return SampleGram([block for gram in grams for block in gram.blocks])
    return np.sum([np.asarray(gram) for gram in grams], axis=0)


def whitened_svd(matrices: np.ndarray, gram: np.ndarray | SampleGram, damping: float = DEFAULT_DAMPING,
                 side: str = "rows", cross: np.ndarray | None = None, rank: int | None = None,
                 solver: Solver = Solver()) -> Decomposition:
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

    A SampleGram is whitened in its samples' span (`rank` and `solver` then choose the SVD, as for a plain one).
    """
    if side not in ("rows", "cols"):
        raise ValueError(f"side must be rows or cols, got {side!r}")
    work = matrices if side == "rows" else np.swapaxes(matrices, 1, 2)
    if isinstance(gram, SampleGram):
        if cross is not None:
            raise ValueError("error compensation needs the Gram itself, not its samples")
        return _oriented(_whitened_by_samples(work, gram, damping, rank, solver), side)
    groups, size = work.shape[0], work.shape[1]
    grams = _per_group(gram, groups, size, "gram")
    crosses = _per_group(cross, groups, size, "cross") if cross is not None else None
    parts = []  # (U, s, Vt) per group, U un-whitened: A = S^-T U (the sqrt(s) split stays in factors())
    for index in range(groups):
        g = np.asarray(grams[index], dtype=np.float64)
        scale = float(np.mean(np.diag(g))) if size else 0.0
        weight = np.asarray(work[index], dtype=np.float64)
        if not np.isfinite(scale) or scale <= 0.0:  # all-zero activations carry no information
            inner = svd(weight[None])  # fresh: its vectors are there (the casts)
            parts.append((cast(np.ndarray, inner.u)[0], inner.s[0], cast(np.ndarray, inner.vt)[0]))
            continue
        root, inverse_t = _gram_root(g, damping * scale)
        if crosses is None:
            target = root.T @ weight
        else:  # S^-1 C W, with S^-1 = (S^-T)^T
            target = inverse_t.T @ (np.asarray(crosses[index], dtype=np.float64) @ weight)
        inner = svd(target[None])
        parts.append((inverse_t @ cast(np.ndarray, inner.u)[0], inner.s[0], cast(np.ndarray, inner.vt)[0]))
    method = "whitened" if cross is None else "compensated"
    u, s, vt = (np.stack(x) for x in zip(*parts))
    return _oriented(Decomposition(u=u, s=s, vt=vt, method=method), side)


def _oriented(result: Decomposition, side: str) -> Decomposition:
    """The decomposition of the weight from that of the matrix whitened on its `side`."""
    if side == "rows":
        return result
    # W^T ~= (S^-T U) diag(s) Vt, hence W ~= V diag(s) (S^-T U)^T.
    u, vt = cast(np.ndarray, result.u), cast(np.ndarray, result.vt)  # fresh: the vectors are there
    return dataclasses.replace(result, u=np.swapaxes(vt, 1, 2), vt=np.swapaxes(u, 1, 2))


def _whitened_by_samples(work: np.ndarray, gram: SampleGram, damping: float, rank: int | None,
                         solver: Solver) -> Decomposition:
    """whitened_svd of one (1, K, N) weight for G = XᵀX with n < K samples, without a K x K matrix.

    With X = P diag(σ) Qᵀ, the symmetric root of G + dI is R = √d I + Q diag(√(σ²+d) - √d) Qᵀ, and
    R⁻¹ = I/√d + Q diag(1/√(σ²+d) - 1/√d) Qᵀ: the target R W and the un-whitening R⁻¹ U are rank-n updates (n x K
    and n x N products), and the SVD of R W costs what the plain SVD does. R is another root than the Cholesky
    factor the Gram path takes; both give the same optimal pair. d is the same relative damping (d = damping x
    mean(diag G), raised where the largest eigenvalue would make R's condition exceed MAX_CONDITION).
    """
    if work.shape[0] != 1 or work.shape[1] != gram.width:
        raise ValueError(f"samples of width {gram.width} do not fit a weight stack of shape {work.shape}")
    samples = gram.vectors()
    size, columns = work.shape[1], work.shape[2]
    scale = float(np.einsum("ij,ij->", samples, samples)) / size
    if not np.isfinite(scale) or scale <= 0.0:  # all-zero activations carry no information
        return decompose(np.asarray(work), rank, solver)
    _, sigma, basis_t = np.linalg.svd(samples, full_matrices=False)  # basis_t: Qᵀ, (n, K)
    del samples
    values = sigma**2
    d = max(damping * scale, float(values.max()) / MAX_CONDITION)
    up = np.sqrt(values + d) - np.sqrt(d)
    down = 1.0 / np.sqrt(values + d) - 1.0 / np.sqrt(d)
    dtype = np.float64 if size * columns <= FLOAT64_MAX_ELEMENTS else np.float32  # as svd() and the sketch work
    basis = basis_t.astype(dtype)
    target = np.array(work[0], dtype=dtype)  # R W = √d (W + Q diag(up/√d) Qᵀ W), built in this copy of W
    update = (up / np.sqrt(d))[:, None].astype(dtype) * (basis @ target)  # n x N
    step = max(1, (1 << 22) // max(1, columns))  # rows per block: no second K x N array (0.5 GB on lm_head 8B)
    for start in range(0, size, step):  # slices, not kept views: `del target` below frees it
        target[start:start + step] += basis[:, start:start + step].T @ update
    del update
    target *= np.sqrt(d)
    inner = decompose(target[None], rank, solver)
    del target  # first: a 14336-wide layer's K x rank float64 arrays below are 117 MB each
    u = np.divide(cast(np.ndarray, inner.u)[0], np.sqrt(d), dtype=np.float64)  # R⁻¹ U = U / √d + Q diag(down) Qᵀ U, in place:
    u += basis_t.T @ ((np.sqrt(d) * down)[:, None] * (basis_t @ u))
    return dataclasses.replace(inner, u=u[None], method="whitened")


def row_weighted_svd(matrices: np.ndarray, weights: np.ndarray) -> Decomposition:
    """The SVD that minimizes Σ_i w_i ||row_i(W − A B)||²: an embedding table whose row i is looked up
    w_i times (whitened_svd with the diagonal Gram of one-hot inputs). Row i is scaled by √w_i before
    the SVD and A's rows by 1/√w_i after; s is the weighted spectrum, so energy rules measure the
    lookups' error."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) != matrices.shape[1] or not np.all(weights > 0):
        raise ValueError(f"row weights must be {matrices.shape[1]} positive numbers")
    roots = np.sqrt(weights)
    inner = svd(np.asarray(matrices, dtype=np.float64) * roots[None, :, None])
    return Decomposition(u=inner.u / roots[None, :, None], s=inner.s, vt=inner.vt, method="frequency")


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
