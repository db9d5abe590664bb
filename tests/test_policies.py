"""Rank rules on matrices with known spectra, the break-even guard, and the global parameter budget."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from graphs import init, make_model, tensor_input
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank


def with_spectrum(singular_values, rows, cols, seed=0):
    """A rows x cols matrix whose singular values are exactly `singular_values`."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * np.asarray(singular_values)) @ v.T


def mlp(widths, seed=0, spectra=None):
    """x -> MatMul W0 -> Relu -> MatMul W1 ...; weights with geometric spectra unless given."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for index, (rows, cols) in enumerate(zip(widths[:-1], widths[1:])):
        k = min(rows, cols)
        spectrum = spectra[index] if spectra else 0.8 ** np.arange(k) * rng.uniform(0.5, 2.0)
        inits.append(init(f"W{index}", with_spectrum(spectrum, rows, cols, seed + index).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [current, f"W{index}"], [f"h{index}"], name=f"fc{index}"))
        nodes.append(helper.make_node("Relu", [f"h{index}"], [f"r{index}"]))
        current = f"r{index}"
    return make_model(nodes, [tensor_input("x", ["batch", widths[0]])], [tensor_input(current, ["batch", widths[-1]])],
                      inits)


def rows(report):
    return {row["name"]: row for row in report["layers"]}


# ----------------------------------------------------------------------------- rank rules


def test_energy_rank_on_known_spectra():
    identity = lowrank.svd(np.eye(10)[None])
    assert lowrank.rank_for_energy(identity, 0.5) == 5
    assert lowrank.rank_for_energy(identity, 0.95) == 10
    rank3 = lowrank.svd(with_spectrum([3.0, 2.0, 1.0], 12, 9)[None])
    assert lowrank.rank_for_energy(rank3, 0.999999) == 3
    assert lowrank.rank_for_energy(rank3, 9 / 14) == 1  # 9 of the 14 units of energy
    assert rank3.retained_energy(2) == pytest.approx(13 / 14)


def test_rank_ratio_and_param_ratio_rules():
    assert lowrank.rank_for_ratio(0.25, 64) == 16
    assert lowrank.rank_for_ratio(0.3, 10) == 3
    assert lowrank.rank_for_ratio(0.01, 10) == 1
    # 64x64 weight, 4096 params, 128 params per rank: half the params is rank 16.
    assert lowrank.rank_for_param_ratio(0.5, 4096, 128, 64) == 16


@given(rank=st.integers(1, 100), multiple=st.sampled_from([1, 2, 8, 16]), limit=st.integers(2, 120))
@settings(max_examples=200, deadline=None)
def test_round_to_multiple_never_reaches_the_limit(rank, multiple, limit):
    rank = min(rank, limit - 1)
    rounded = lowrank.round_to_multiple(rank, multiple, limit)
    assert rounded >= rank
    assert rounded < limit
    assert rounded % multiple == 0 or rounded == rank


def test_factors_multiply_back_at_full_rank_and_truncate_optimally():
    matrix = with_spectrum([5.0, 3.0, 1.0, 0.5], 7, 6)
    decomposition = lowrank.svd(matrix[None])
    a, b = decomposition.factors(4)
    np.testing.assert_allclose(a[0] @ b[0], matrix, atol=1e-12)
    a, b = decomposition.factors(2)
    # Eckart-Young: the rank-2 error is exactly the tail of the spectrum.
    assert np.linalg.norm(matrix - a[0] @ b[0]) == pytest.approx(math.hypot(1.0, 0.5))


# ----------------------------------------------------------------------------- policies in the pipeline


def test_each_policy_gives_the_expected_rank():
    model = mlp([64, 64])
    assert rows(onnxlr.optimize(model, rank_ratio=0.25, verify=False)[1])["fc0"]["rank"] == 16
    assert rows(onnxlr.optimize(model, rank=5, verify=False)[1])["fc0"]["rank"] == 5
    assert rows(onnxlr.optimize(model, param_ratio=0.5, verify=False)[1])["fc0"]["rank"] == 16
    report = onnxlr.optimize(model, energy=0.9, verify=False)[1]
    spectrum = 0.8 ** np.arange(64)
    expected = int(np.searchsorted(np.cumsum(spectrum**2) / np.sum(spectrum**2), 0.9)) + 1
    assert rows(report)["fc0"]["rank"] == expected
    assert rows(report)["fc0"]["retained_energy"] >= 0.9


def test_break_even_guard_and_allow_no_gain():
    model = mlp([64, 64])
    report = onnxlr.optimize(model, rank_ratio=0.6, verify=False)[1]  # rank 39 > break-even 32 for 64x64
    row = rows(report)["fc0"]
    assert row["status"] == "skipped"
    assert row["reason_code"] == "no_gain"
    assert row["reason"] == "no gain: rank 39 >= break-even 32"
    row = rows(onnxlr.optimize(model, rank_ratio=0.6, allow_no_gain=True, verify=False)[1])["fc0"]
    assert row["status"] == "factorized" and row["rank"] == 39


def test_rank_multiple_rounds_up_but_not_past_break_even():
    model = mlp([64, 64])
    assert rows(onnxlr.optimize(model, rank=10, rank_multiple=8, verify=False)[1])["fc0"]["rank"] == 16
    # rank 30 rounds up to 32 = break-even: stays 30.
    assert rows(onnxlr.optimize(model, rank=30, rank_multiple=8, verify=False)[1])["fc0"]["rank"] == 30


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7, 0.9])
def test_param_budget_is_met_and_spends_on_the_layers_that_need_it(budget):
    # fc0 has a flat spectrum (incompressible), fc1 a fast-decaying one (compressible).
    spectra = [np.ones(48), 0.5 ** np.arange(48)]
    model = mlp([48, 48, 48], spectra=spectra)
    report = onnxlr.optimize(model, param_budget=budget, verify=False)[1]
    layers = rows(report)
    before = sum(layers[n]["params_before"] for n in ("fc0", "fc1"))
    after = sum(layers[n]["params_after"] for n in ("fc0", "fc1"))
    assert after <= budget * before
    assert after >= budget * before - 2 * (48 + 48)  # the budget is used, not wasted
    if layers["fc1"]["status"] == "factorized" and layers["fc0"]["status"] == "factorized":
        assert layers["fc0"]["rank"] >= layers["fc1"]["rank"]


def test_param_budget_too_small_is_refused():
    with pytest.raises(OnnxlrError, match="too small"):
        onnxlr.optimize(mlp([8, 8]), param_budget=0.01, verify=False)


def test_filters_ops_include_exclude_min_params():
    model = mlp([32, 32, 32, 4])
    report = onnxlr.optimize(model, rank=2, exclude=("fc1",), min_params=200, verify=False)[1]
    layers = rows(report)
    assert layers["fc0"]["status"] == "factorized"
    assert layers["fc1"]["reason_code"] == "excluded"
    assert layers["fc2"]["reason_code"] == "min_params"
    report = onnxlr.optimize(model, rank=2, include=("fc1",), verify=False)[1]
    assert [r["name"] for r in report["layers"] if r["status"] == "factorized"] == ["fc1"]
    report = onnxlr.optimize(model, rank=2, ops=("Conv",), verify=False)[1]
    assert report["layers"] == []


@pytest.mark.parametrize("bad", [
    {"rank_ratio": 0}, {"rank_ratio": -0.5}, {"rank_ratio": 1.5}, {"rank_ratio": float("nan")},
    {"rank_ratio": "half"}, {"rank": 0}, {"energy": 1.01}, {"rank_ratio": 0.5, "rank": 3},
    {"ops": ("Softmax",)}, {"conv_scheme": "diagonal"}, {"rank_multiple": 0},
])
def test_bad_settings_are_refused(bad):
    with pytest.raises(OnnxlrError):
        onnxlr.optimize(mlp([8, 8]), **bad, verify=False)


def test_report_totals_are_consistent():
    model = mlp([32, 32, 16])
    new_model, report = onnxlr.optimize(model, rank=4, verify=False)
    totals = report["totals"]
    assert totals["params_before"] == 32 * 32 + 32 * 16
    assert totals["params_after"] == 4 * (32 + 32) + 4 * (32 + 16)
    assert totals["bytes_after"] == 4 * totals["params_after"]
    assert totals["factorized"] == 2
    assert sum(t.dims[0] * t.dims[1] for t in new_model.graph.initializer) == totals["params_after"]


def test_param_budget_frees_vectors_while_planning_and_still_writes_optimal_factors(monkeypatch):
    """Past PLANNING_VECTOR_BYTES, budget planning keeps only spectra (one layer's SVD at a time); the
    rewrite computes the SVD again, and each written pair is still the best rank-r approximation."""
    from onnxlr.factorize import plan

    kept_vectors = []
    allocate = plan.allocate_budget

    def spy(decided, groups, settings, *units):
        kept_vectors.extend(d.u is not None for g in groups for d in decided.svd.decompositions(g).values())
        return allocate(decided, groups, settings, *units)

    monkeypatch.setattr(plan, "allocate_budget", spy)
    monkeypatch.setattr(plan, "PLANNING_VECTOR_BYTES", 0)  # as for a model too large to keep them
    spectra = [np.linspace(3.0, 0.1, 32), 0.7 ** np.arange(32)]
    model = mlp([32, 32, 32], spectra=spectra)
    new_model, report = onnxlr.optimize(model, param_budget=0.5, verify=False)
    assert kept_vectors and not any(kept_vectors)
    assert report["totals"]["factorized"] >= 1
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    written = {t.name: onnx.numpy_helper.to_array(t) for t in new_model.graph.initializer}
    for index, row in enumerate(report["layers"]):
        if row["status"] != "factorized":
            continue
        product = written[f"W{index}_lr_a"].astype(np.float64) @ written[f"W{index}_lr_b"]
        u, s, vt = np.linalg.svd(weights[f"W{index}"].astype(np.float64))
        best = (u[:, :row["rank"]] * s[:row["rank"]]) @ vt[:row["rank"]]
        np.testing.assert_allclose(product, best, atol=1e-4)
    monkeypatch.setattr(plan, "PLANNING_VECTOR_BYTES", 1 << 40)  # everything kept: the same bytes
    assert onnxlr.optimize(model, param_budget=0.5, verify=False)[0].SerializeToString() == new_model.SerializeToString()
