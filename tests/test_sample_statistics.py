"""Calibration statistics kept as samples: few vectors of a wide activation, on disk instead of a K x K Gram.

The whitened SVD in the samples' span must give the pair the Gram path gives (the same optimum, another root of
G + dI), and the accumulator must hold what a GramAccumulator would (the same Gram, sums and count).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr.calibrate import calibration
from onnxlr.factorize import lowrank


def _inputs(rng: np.random.Generator, count: int, width: int) -> np.ndarray:
    """Correlated vectors: columns of very different scales, as real activations have."""
    return rng.standard_normal((count, width)) * rng.uniform(0.05, 3.0, width)


def _product(decomposition: lowrank.Decomposition, rank: int) -> np.ndarray:
    a, b = decomposition.factors(rank)
    return a[0] @ b[0]


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_whitening_by_samples_gives_the_gram_paths_pair(side):
    rng = np.random.default_rng(0)
    width, other, count = 120, 70, 30
    samples = _inputs(rng, count, width)
    weight = rng.standard_normal((width, other)) if side == "rows" else rng.standard_normal((other, width))
    by_gram = lowrank.whitened_svd(weight[None], samples.T @ samples, side=side)
    # Two blocks, one in float32 as a float32 model's activations arrive.
    split = lowrank.SampleGram([samples[:12].astype(np.float32), samples[12:]])
    by_samples = lowrank.whitened_svd(weight[None], lowrank.SampleGram([samples]), side=side)
    np.testing.assert_allclose(by_samples.s, by_gram.s, rtol=1e-9, atol=1e-9 * by_gram.s.max())
    for rank in (5, count, 50):
        expected = _product(by_gram, rank)
        np.testing.assert_allclose(_product(by_samples, rank), expected, atol=1e-8 * np.abs(expected).max())
        # float32 storage rounds the samples: the pair moves by about that much, no more.
        moved = np.linalg.norm(_product(lowrank.whitened_svd(weight[None], split, side=side), rank) - expected)
        assert moved <= 1e-4 * np.linalg.norm(expected)
    # Exact at full rank.
    full = by_samples.full_rank
    np.testing.assert_allclose(_product(by_samples, full), weight, atol=1e-9 * np.abs(weight).max())
    assert by_samples.method == "whitened"


@settings(max_examples=25, deadline=None)
@given(width=st.integers(2, 40), other=st.integers(1, 30), count=st.integers(1, 40), seed=st.integers(0, 1000),
       side=st.sampled_from(["rows", "cols"]))
def test_whitening_by_samples_matches_the_whitened_error_of_the_gram_path(width, other, count, seed, side):
    """Any shapes: the samples' pair is as good on the whitened objective as the Gram path's (they may differ by a
    rotation where singular values tie), and exact at full rank."""
    rng = np.random.default_rng(seed)
    samples = _inputs(rng, count, width)
    weight = rng.standard_normal((width, other)) if side == "rows" else rng.standard_normal((other, width))
    gram = samples.T @ samples
    by_gram = lowrank.whitened_svd(weight[None], gram, side=side)
    by_samples = lowrank.whitened_svd(weight[None], lowrank.SampleGram([samples]), side=side)
    damped = gram + lowrank.DEFAULT_DAMPING * np.mean(np.diag(gram)) * np.eye(width)

    def whitened_error(product: np.ndarray) -> float:
        difference = (weight - product) if side == "rows" else (weight - product).T
        return float(np.sum(difference * (damped @ difference)))

    scale = whitened_error(np.zeros_like(weight)) + 1e-300
    for rank in sorted({1, min(width, other) // 2 or 1, by_samples.full_rank}):
        assert whitened_error(_product(by_samples, rank)) <= whitened_error(_product(by_gram, rank)) + 1e-8 * scale
    full = _product(by_samples, by_samples.full_rank)
    np.testing.assert_allclose(full, weight, atol=1e-7 * np.abs(weight).max())


def test_whitening_by_samples_takes_the_randomized_svd_at_a_rank():
    """Given a rank (as the rewrite gives one), a large weight takes the randomized SVD of its whitened matrix;
    with the rank above the number of samples, the samples' outputs are still kept exactly."""
    rng = np.random.default_rng(1)
    width, other, count, rank = 1024, 768, 64, 96
    samples = _inputs(rng, count, width)
    weight = rng.standard_normal((width, other))
    result = lowrank.whitened_svd(weight[None], lowrank.SampleGram([samples]), rank=rank,
                                  solver=lowrank.Solver("auto"))
    assert result.solver == "randomized" and result.partial and result.full_rank == rank
    error = np.linalg.norm(samples @ (weight - _product(result, rank))) / np.linalg.norm(samples @ weight)
    assert error < 1e-5
    plain = lowrank.decompose(weight[None], rank, lowrank.Solver("auto"))
    assert np.linalg.norm(samples @ (weight - _product(plain, rank))) / np.linalg.norm(samples @ weight) > 0.3


def test_zero_samples_fall_back_to_the_plain_svd():
    weight = np.random.default_rng(2).standard_normal((6, 4))
    result = lowrank.whitened_svd(weight[None], lowrank.SampleGram([np.zeros((3, 6))]))
    np.testing.assert_allclose(result.s[0], np.linalg.svd(weight, compute_uv=False), rtol=1e-12)


def test_compensation_needs_the_gram_itself():
    samples = np.ones((2, 4))
    with pytest.raises(ValueError, match="compensation"):
        lowrank.whitened_svd(np.ones((1, 4, 3)), lowrank.SampleGram([samples]), cross=np.eye(4))


def test_sample_accumulator_keeps_vectors_on_disk_and_agrees_with_the_gram():
    rng = np.random.default_rng(3)
    width = 64
    batches = [rng.standard_normal((n, width)).astype(np.float32) for n in (10, 7, 9)]  # 26 <= 32 = width / 2
    samples, gram = calibration.SampleAccumulator(), calibration.GramAccumulator()
    for batch in batches:
        samples.add(batch)
        gram.add(batch)
    result = samples.result()
    assert isinstance(result, lowrank.SampleGram) and result.count == 26
    assert isinstance(result.blocks[0], np.memmap) and result.blocks[0].dtype == np.float32  # on disk, as given
    np.testing.assert_allclose(np.asarray(result), gram.result(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(samples.sums, gram.sums, rtol=1e-9)
    assert samples.count == gram.count == 26
    assert samples.result().blocks[0] is result.blocks[0] and samples.file.closed  # mapped once, file closed
    with pytest.raises(ValueError, match="already taken"):
        samples.add(batches[0])
    # Past half the width the vectors become a Gram, with every vector seen so far in it.
    samples, gram = calibration.SampleAccumulator(), calibration.GramAccumulator()
    for batch in [*batches, rng.standard_normal((8, width)).astype(np.float32)]:
        samples.add(batch)
        gram.add(batch)
    assert samples.file is None and isinstance(samples.result(), np.ndarray)
    np.testing.assert_allclose(samples.result(), gram.result(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(samples.sums, gram.sums, rtol=1e-9)
    assert samples.count == 34


def test_summed_grams_put_the_readers_samples_side_by_side():
    rng = np.random.default_rng(4)
    first, second = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    summed = lowrank.summed_grams([lowrank.SampleGram([first]), lowrank.SampleGram([second])])
    assert isinstance(summed, lowrank.SampleGram) and summed.count == 7
    np.testing.assert_allclose(np.asarray(summed), first.T @ first + second.T @ second)
    mixed = lowrank.summed_grams([lowrank.SampleGram([first]), second.T @ second])
    np.testing.assert_allclose(mixed, first.T @ first + second.T @ second)
