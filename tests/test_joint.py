"""Joint compression of an MLP pair (onnxlr.coupled.joint): statistics, OBS selection, refit and analytic error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr.coupled import joint


def _gram(activations: np.ndarray) -> np.ndarray:
    stats = joint.AugmentedGram()
    stats.add(activations)
    return stats.result()


def _activations(seed: int = 0, rows: int = 3000, width: int = 24) -> np.ndarray:
    """ReLU activations with a dead neuron, an exact multiple and a near-copy."""
    rng = np.random.default_rng(seed)
    z = np.maximum(rng.standard_normal((rows, width)) @ rng.standard_normal((width, width)) + 0.3, 0.0)
    z[:, 3] = 0.0
    z[:, 5] = 2.0 * z[:, 7]
    z[:, 9] = z[:, 11] + 1e-3 * rng.standard_normal(rows)
    return z


def _problem(seed: int = 0, width: int = 24, d_out: int = 10, bias: bool = True):
    rng = np.random.default_rng(seed + 100)
    z = _activations(seed, width=width)
    return z, rng.standard_normal((width, d_out)), (rng.standard_normal(d_out) if bias else None)


def _measured_error(z, w2, b2, fit: joint.JointFit) -> float:
    """||Z W2 + b2 − (Z_S W2' + b2')||² / ||Z W2 + b2||² on the very rows."""
    target = z @ w2 + (0.0 if b2 is None else b2)
    approx = z[:, fit.kept] @ fit.down_matrix + (0.0 if fit.down_bias is None else fit.down_bias)
    return float(np.sum((target - approx) ** 2) / np.sum(target**2))


def _lstsq_fit(z, w2, b2, kept):
    """Refit on the activations themselves: returns (matrix, bias or None, relative error)."""
    target = z @ w2 + (0.0 if b2 is None else b2)
    design = z[:, kept] if b2 is None else np.hstack([z[:, kept], np.ones((len(z), 1))])
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    error = np.sum((target - design @ solution) ** 2) / np.sum(target**2)
    return solution[: len(kept)], (None if b2 is None else solution[len(kept)]), error


def _error_of_set(w2, b2, correlation, kept) -> float:
    """Relative error of the least-squares refit on a given set (via the analytic route of the module)."""
    weights, corr, ridge = joint._problem(w2, b2, correlation, 1e-6)
    return joint._refit(weights, corr, ridge, w2.shape[0], np.asarray(kept), b2 is not None)[1]


@pytest.mark.parametrize("bias", [True, False])
def test_keep_all_is_identity(bias):
    z, w2, b2 = _problem(bias=bias)
    w2 = w2.astype(np.float32)
    fit = joint.select_and_refit(w2, b2, _gram(z), w2.shape[0])
    assert np.array_equal(fit.kept, np.arange(w2.shape[0])) and fit.kept.dtype == np.int64
    assert fit.down_matrix.dtype == np.float64 and np.array_equal(fit.down_matrix, w2.astype(np.float64))
    assert (fit.down_bias is None) if not bias else np.array_equal(fit.down_bias, b2)
    assert fit.relative_error == 0.0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep", [1, 6, 12, 20, 23])
def test_analytic_error_matches_activations_and_lstsq(bias, keep):
    z, w2, b2 = _problem(seed=keep, bias=bias)
    fit = joint.select_and_refit(w2, b2, _gram(z), keep)
    assert len(fit.kept) == keep and np.all(np.diff(fit.kept) > 0)
    assert fit.down_matrix.shape == (keep, w2.shape[1])
    assert (fit.down_bias is None) == (not bias)
    assert fit.relative_error == pytest.approx(_measured_error(z, w2, b2, fit), abs=1e-8)
    assert fit.relative_error == pytest.approx(_lstsq_fit(z, w2, b2, fit.kept)[2], abs=1e-8)


@pytest.mark.parametrize("bias", [True, False])
def test_refit_equals_lstsq_with_tiny_ridge(bias):
    rng = np.random.default_rng(3)
    z = np.maximum(rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 16)) + 0.5, 0.0)
    w2, b2 = rng.standard_normal((16, 5)), (rng.standard_normal(5) if bias else None)
    fit = joint.select_and_refit(w2, b2, _gram(z), 7, ridge_scale=1e-13)
    matrix, offset, _ = _lstsq_fit(z, w2, b2, fit.kept)
    np.testing.assert_allclose(fit.down_matrix, matrix, rtol=1e-7, atol=1e-8)
    if bias:
        np.testing.assert_allclose(fit.down_bias, offset, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("bias", [True, False])
def test_error_decreases_with_keep(bias):
    z, w2, b2 = _problem(seed=5, bias=bias)
    keeps = list(range(1, w2.shape[0] + 1))
    elimination = joint.eliminate(w2, b2, _gram(z))
    curve = [elimination.fit(k).relative_error for k in keeps]
    assert all(later <= earlier + 1e-10 for earlier, later in zip(curve, curve[1:]))
    assert curve[-1] == 0.0 and curve[0] <= 1.0 + 1e-12
    assert curve == [joint.select_and_refit(w2, b2, _gram(z), k).relative_error for k in keeps]


def test_obs_beats_norm_and_random_selection_on_redundant_neurons():
    rng = np.random.default_rng(7)
    base = np.maximum(rng.standard_normal((4000, 16)) @ rng.standard_normal((16, 16)), 0.0)
    copies = base[:, rng.permutation(16)] * rng.uniform(0.5, 2.0, 16) + 1e-4 * rng.standard_normal(base.shape)
    z = np.hstack([base, copies])
    w2, b2 = rng.standard_normal((32, 8)), rng.standard_normal(8)
    correlation = _gram(z)
    obs = joint.select_and_refit(w2, b2, correlation, 16).relative_error
    assert obs < 1e-6
    by_norm = np.sort(np.argsort(-np.sum(w2**2, axis=1), kind="stable")[:16])
    assert obs <= _error_of_set(w2, b2, correlation, by_norm)
    for _ in range(10):
        assert obs <= _error_of_set(w2, b2, correlation, np.sort(rng.choice(32, 16, replace=False)))


def test_obs_scores_are_the_cost_of_one_drop():
    z, w2, b2 = _problem(seed=2)
    correlation = _gram(z)
    scores = joint.obs_scores(w2, b2, correlation, ridge_scale=1e-13)
    assert scores.shape == (w2.shape[0],) and scores[3] == pytest.approx(0.0, abs=1e-6)
    total = np.sum((z @ w2 + b2) ** 2)
    fit = joint.select_and_refit(w2, b2, correlation, w2.shape[0] - 1, ridge_scale=1e-13)
    dropped = np.setdiff1d(np.arange(w2.shape[0]), fit.kept)
    assert dropped.tolist() == [int(np.argmin(scores))]
    assert fit.relative_error == pytest.approx(scores.min() / total, abs=1e-9)
    for j in (0, 10, 17):
        kept = np.delete(np.arange(w2.shape[0]), j)
        assert _lstsq_fit(z, w2, b2, kept)[2] == pytest.approx(scores[j] / total, rel=1e-6, abs=1e-10)


def _naive_order(w2, b2, correlation, drops):
    """Greedy OBS with the full inverse and W̃ updated after every drop (the reference)."""
    weights, corr, ridge = joint._problem(w2, b2, correlation, 1e-6)
    inverse, width, order = np.linalg.inv(corr + ridge * np.eye(len(corr))), w2.shape[0], []
    for _ in range(drops):
        diag = np.diag(inverse)[:width]
        scores = np.where(diag > 0, np.sum(weights[:width] ** 2, axis=1) / np.where(diag > 0, diag, 1), np.inf)
        scores[order] = np.inf
        j = width - 1 - int(np.argmin(scores[::-1]))
        column = inverse[:, j].copy()
        weights = weights - np.outer(column / column[j], weights[j])
        inverse = inverse - np.outer(column, column / column[j])
        order.append(j)
    return order


@pytest.mark.parametrize("flush", [1, 3, 256])
def test_blocked_elimination_matches_naive_reference(monkeypatch, flush):
    monkeypatch.setattr(joint, "_FLUSH", flush)
    rng = np.random.default_rng(11)
    z = np.maximum(rng.standard_normal((3000, 20)) @ rng.standard_normal((20, 20)), 0.0)
    w2, b2 = rng.standard_normal((20, 6)), rng.standard_normal(6)
    correlation = _gram(z)
    weights, corr, ridge = joint._problem(w2, b2, correlation, 1e-6)
    order, _ = joint._elimination_order(weights, corr, ridge, 20, 19)
    assert order.tolist() == _naive_order(w2, b2, correlation, 19)


def test_deterministic_and_float32_inputs():
    z, w2, b2 = _problem(seed=4)
    correlation = _gram(z.astype(np.float32))
    first = joint.select_and_refit(w2.astype(np.float32), b2.astype(np.float32), correlation, 9)
    second = joint.select_and_refit(w2.astype(np.float32).copy(), b2.astype(np.float32), correlation.copy(), 9)
    assert np.array_equal(first.kept, second.kept) and first.relative_error == second.relative_error
    assert np.array_equal(first.down_matrix, second.down_matrix) and np.array_equal(first.down_bias, second.down_bias)
    assert first.down_matrix.dtype == np.float64 and first.down_bias.dtype == np.float64


def test_ties_keep_the_lower_index():
    correlation = _gram(np.eye(6))  # orthogonal neurons, equal weights: every score ties
    fit = joint.select_and_refit(np.ones((6, 2)), None, correlation, 2)
    assert fit.kept.tolist() == [0, 1]


def test_all_zero_statistics_are_finite():
    w2, b2 = np.ones((4, 3)), np.ones(3)
    correlation = np.zeros((5, 5))
    assert np.all(np.isfinite(joint.obs_scores(w2, b2, correlation)))
    fit = joint.select_and_refit(w2, b2, correlation, 2)
    assert fit.relative_error == 0.0 and np.all(np.isfinite(fit.down_matrix)) and np.all(np.isfinite(fit.down_bias))


def test_invalid_arguments():
    z, w2, b2 = _problem()
    correlation = _gram(z)
    for keep in (0, w2.shape[0] + 1):
        with pytest.raises(ValueError):
            joint.select_and_refit(w2, b2, correlation, keep)
    with pytest.raises(ValueError):
        joint.select_and_refit(w2, b2, correlation[:-1, :-1], 3)
    with pytest.raises(ValueError):
        joint.obs_scores(w2, b2, correlation, ridge_scale=-1.0)


def test_augmented_gram_streams():
    z = _activations(1, rows=500, width=12)
    whole = _gram(z)
    streamed = joint.AugmentedGram()
    assert streamed.result() is None and streamed.count == 0
    for batch in np.array_split(z, [1, 100, 101, 350]):
        streamed.add(batch)
    np.testing.assert_allclose(streamed.result(), whole, rtol=1e-12, atol=1e-9)
    augmented = np.hstack([z, np.ones((500, 1))])
    np.testing.assert_allclose(whole, augmented.T @ augmented, rtol=1e-12)
    assert streamed.count == 500 and streamed.result().dtype == np.float64
    stacked = joint.AugmentedGram()
    stacked.add(z.reshape(5, 100, 12))
    np.testing.assert_allclose(stacked.result(), whole, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError):
        stacked.add(np.ones((3, 13)))


@settings(max_examples=200, deadline=None)
@given(d_in=st.integers(1, 64), width=st.integers(1, 256), d_out=st.integers(1, 64), params=st.integers(0, 40000),
       up_bias=st.booleans(), down_bias=st.booleans())
def test_keep_for_params(d_in, width, d_out, params, up_bias, down_bias):
    keep = joint.keep_for_params(d_in, width, d_out, params, up_bias, down_bias)
    assert 1 <= keep <= width
    cost = joint.pair_params(d_in, width, d_out, keep, up_bias, down_bias)
    assert cost <= params or keep == 1
    if keep < width:
        assert joint.pair_params(d_in, width, d_out, keep + 1, up_bias, down_bias) > params
    full = joint.pair_params(d_in, width, d_out, width, up_bias, down_bias)
    assert full == d_in * width + width * d_out + (width if up_bias else 0) + (d_out if down_bias else 0)
    assert joint.keep_for_params(d_in, width, d_out, full, up_bias, down_bias) == width


@pytest.mark.parametrize("seed", range(4))
def test_joint_beats_svd_of_the_down_matrix_at_equal_params(seed):
    """A ReLU MLP on correlated Gaussian inputs: keeping D/2 neurons and refitting W2 loses (far) less than
    the best rank-r SVD of W2 alone with the same W2 parameter count (r·(D+d2) <= k·d2), which also leaves
    W1 whole. (An activation-aware SVD of W2 is NOT robustly beaten, so it is not compared.)"""
    rng = np.random.default_rng(seed)
    d_in, width, d_out = 32, 64, 32
    x = rng.standard_normal((4000, d_in)) @ (rng.standard_normal((d_in, d_in)) / np.sqrt(d_in))
    w1, b1 = rng.standard_normal((d_in, width)) / np.sqrt(d_in), 0.1 * rng.standard_normal(width)
    w2, b2 = rng.standard_normal((width, d_out)) / np.sqrt(width), 0.1 * rng.standard_normal(d_out)
    z = np.maximum(x @ w1 + b1, 0.0)
    keep = width // 2
    fit = joint.select_and_refit(w2, b2, _gram(z), keep)
    rank = keep * d_out // (width + d_out)
    u, s, vt = np.linalg.svd(w2, full_matrices=False)
    truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
    svd_error = np.sum((z @ (w2 - truncated)) ** 2) / np.sum((z @ w2 + b2) ** 2)
    assert fit.relative_error < 0.5 * svd_error


@pytest.mark.parametrize("bias", [True, False])
def test_elimination_prices_every_keep_like_the_refit(bias):
    """error(k) read off the elimination equals the solved refit's error, and fit(k) is select_and_refit's."""
    z, w2, b2 = _problem(seed=5, bias=bias)
    correlation = _gram(z)
    elimination = joint.eliminate(w2, b2, correlation)
    assert elimination.error(w2.shape[0]) == 0.0
    for keep in (1, 4, 11, 23):
        fit = joint.select_and_refit(w2, b2, correlation, keep)
        assert elimination.error(keep) == pytest.approx(fit.relative_error, rel=1e-3, abs=1e-6)
        again = elimination.fit(keep)
        np.testing.assert_array_equal(again.kept, fit.kept)
        np.testing.assert_allclose(again.down_matrix, fit.down_matrix)
    errors = [elimination.error(k) for k in range(1, w2.shape[0] + 1)]
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    if bias:  # ||Z·W2||² / ||Z·W2 + b2||²: positive, and not bounded by 1 (a bias can cancel part of Z·W2)
        assert elimination.plain_share > 0
    else:
        assert elimination.plain_share == pytest.approx(1.0)


# ----------------------------------------------------------------------------- blocks (conv channel pairs)

BLOCK = 4


def _block_problem(seed: int = 0, width: int = 8, d_out: int = 5, bias: bool = True, rows: int = 3000,
                   copy: bool = True):
    """Vectors of `width` neurons of BLOCK rows each (a dead neuron, a near-copy of another), W2 and b2."""
    rng = np.random.default_rng(seed)
    size = width * BLOCK
    z = np.maximum(rng.standard_normal((rows, size)) @ rng.standard_normal((size, size)) + 0.3, 0.0)
    z[:, 1 * BLOCK:2 * BLOCK] = 0.0
    if copy:
        z[:, 3 * BLOCK:4 * BLOCK] = z[:, 4 * BLOCK:5 * BLOCK] + 1e-3 * rng.standard_normal((rows, BLOCK))
    return z, rng.standard_normal((size, d_out)), (rng.standard_normal(d_out) if bias else None)


def _block_rows(kept) -> np.ndarray:
    return (np.asarray(kept)[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_block_keep_all_is_identity(bias):
    z, w2, b2 = _block_problem(bias=bias)
    fit = joint.select_and_refit(w2, b2, _gram(z), 8, block=BLOCK)
    assert fit.kept.tolist() == list(range(8)) and np.array_equal(fit.down_matrix, w2) and fit.relative_error == 0.0
    assert (fit.down_bias is None) if not bias else np.array_equal(fit.down_bias, b2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep", [1, 3, 6, 7])
def test_block_refit_equals_lstsq_on_the_vectors(bias, keep):
    z, w2, b2 = _block_problem(seed=keep, bias=bias, copy=False)  # well-posed: the solutions compare too
    fit = joint.select_and_refit(w2, b2, _gram(z), keep, block=BLOCK, ridge_scale=1e-13)
    assert len(fit.kept) == keep and np.all(np.diff(fit.kept) > 0) and fit.down_matrix.shape == (keep * BLOCK, 5)
    matrix, offset, error = _lstsq_fit(z, w2, b2, _block_rows(fit.kept))
    np.testing.assert_allclose(fit.down_matrix, matrix, rtol=1e-6, atol=1e-7)
    if bias:
        np.testing.assert_allclose(fit.down_bias, offset, rtol=1e-6, atol=1e-7)
    assert fit.relative_error == pytest.approx(error, abs=1e-8)
    target = z @ w2 + (0.0 if b2 is None else b2)
    approx = z[:, _block_rows(fit.kept)] @ fit.down_matrix + (0.0 if b2 is None else fit.down_bias)
    assert fit.relative_error == pytest.approx(np.sum((target - approx) ** 2) / np.sum(target**2), abs=1e-8)


@pytest.mark.parametrize("flush", [1, 5, 256])
def test_block_one_is_the_scalar_path(monkeypatch, flush):
    """The block elimination at block=1 drops what the scalar (default) path drops, at the same costs."""
    monkeypatch.setattr(joint, "_FLUSH", flush)
    z, w2, b2 = _problem(seed=6)
    weights, corr, ridge = joint._problem(w2, b2, _gram(z), 1e-6)
    order, added = joint._elimination_order(weights, corr, ridge, 24, 23)
    block_order, block_added = joint._block_elimination_order(weights, corr, ridge, 24, 1, 23)
    assert block_order.tolist() == order.tolist()
    np.testing.assert_allclose(block_added, added, rtol=1e-6, atol=1e-9 * np.sum(weights * (corr @ weights)))
    assert np.array_equal(joint.obs_scores(w2, b2, _gram(z), block=1), joint.obs_scores(w2, b2, _gram(z)))


def _refit_loss(weights, hessian, rows) -> float:
    """min over P on `rows` of tr((W̃ − P)ᵀ H (W̃ − P)), solved directly."""
    cross = hessian[rows] @ weights
    return float(np.sum(weights * (hessian @ weights)) - np.sum(cross * np.linalg.solve(hessian[np.ix_(rows, rows)],
                                                                                       cross)))


@pytest.mark.parametrize("flush", [2, 256])
@pytest.mark.parametrize("bias", [True, False])
def test_block_greedy_matches_brute_force(monkeypatch, flush, bias):
    """Each drop is the neuron whose removal (the rest refitted) costs least, and costs its score."""
    monkeypatch.setattr(joint, "_FLUSH", flush)
    z, w2, b2 = _block_problem(seed=3, bias=bias)
    weights, corr, ridge = joint._problem(w2, b2, _gram(z), 1e-6)
    hessian = corr + ridge * np.eye(len(corr))
    order, added = joint._block_elimination_order(weights, corr, ridge, 8, BLOCK, 7)
    alive, constant = list(range(8)), [8 * BLOCK] if bias else []
    for dropped, cost in zip(order, added):
        now = _refit_loss(weights, hessian, np.append(_block_rows(alive), constant).astype(int))
        costs = {j: _refit_loss(weights, hessian, np.append(_block_rows([i for i in alive if i != j]), constant)
                                .astype(int)) - now for j in alive}
        assert dropped == min(costs, key=lambda j: (costs[j], -j))
        assert cost == pytest.approx(costs[dropped], rel=1e-6, abs=1e-9 * now)
        alive.remove(dropped)


def test_block_obs_scores_are_the_cost_of_one_drop():
    z, w2, b2 = _block_problem(seed=2)
    scores = joint.obs_scores(w2, b2, _gram(z), ridge_scale=1e-13, block=BLOCK)
    assert scores.shape == (8,) and scores[1] == pytest.approx(0.0, abs=1e-6)
    total = np.sum((z @ w2 + b2) ** 2)
    for j in (0, 3, 7):
        kept = np.delete(np.arange(8), j)
        assert _lstsq_fit(z, w2, b2, _block_rows(kept))[2] == pytest.approx(scores[j] / total, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_block_elimination_prices_every_keep_like_the_refit(bias):
    z, w2, b2 = _block_problem(seed=5, bias=bias)
    correlation = _gram(z)
    elimination = joint.eliminate(w2, b2, correlation, block=BLOCK)
    assert elimination.width == 8 and elimination.error(8) == 0.0
    curve = [elimination.fit(k).relative_error for k in range(1, 9)]
    assert all(later <= earlier + 1e-10 for earlier, later in zip(curve, curve[1:]))
    for keep in range(1, 9):
        fit = joint.select_and_refit(w2, b2, correlation, keep, block=BLOCK)
        assert elimination.error(keep) == pytest.approx(fit.relative_error, rel=1e-3, abs=1e-6)
        assert curve[keep - 1] == fit.relative_error
        again = elimination.fit(keep)
        np.testing.assert_array_equal(again.kept, fit.kept)
        np.testing.assert_allclose(again.down_matrix, fit.down_matrix)


def test_block_drops_a_dead_neuron_and_one_of_two_copies_first():
    z, w2, b2 = _block_problem(seed=8)
    fit = joint.select_and_refit(w2, b2, _gram(z), 6, block=BLOCK)
    dropped = sorted(set(range(8)) - set(fit.kept.tolist()))
    assert 1 in dropped and len({3, 4} & set(dropped)) == 1
    assert fit.relative_error < 1e-5


def test_rows_must_be_whole_blocks():
    z, w2, b2 = _block_problem()
    with pytest.raises(ValueError, match="blocks"):
        joint.select_and_refit(w2[:-1], b2, _gram(z[:, :-1]), 2, block=BLOCK)
    with pytest.raises(ValueError, match="blocks"):
        joint.eliminate(w2, b2, _gram(z), block=0)
