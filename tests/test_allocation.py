"""Rank planning on fixed spectra: the whole-model budget allocation and the per-layer planner.

Each weight is U·diag(s)·Vt with random orthogonal U, V and a chosen spectrum s, so the singular
values the planner sees are known in advance. The weights sit in a small model of MatMuls (one per
weight) only because a WeightGroup is made of the targets the target finder returns. Each group is read with its
decision in the plan under test (`Layer`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import parse_text
from onnxlr.passes import Context

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import plan
from onnxlr.factorize.decisions import Plan
from onnxlr.factorize.groups import WeightGroup
from onnxlr.factorize.svd import Statistics, SvdCache
from onnxlr.factorize.targets import find_targets
from onnxlr.model_io.shapes import default_opset, infer_shapes
from onnxlr.settings import Settings, no_progress

INDEX = np.arange(32)
FAST = 0.5**INDEX  # most energy in the first few directions
SLOW = 1.0 / np.sqrt(1.0 + INDEX)  # energy spread over many directions
MEDIUM = 0.85**INDEX


# ----------------------------------------------------------------------------- helpers


def spectral(s: np.ndarray, rows: int, cols: int, seed: int) -> np.ndarray:
    """A rows x cols float32 matrix whose singular values are `s` (len(s) == min(rows, cols))."""
    rng = np.random.default_rng(seed)
    assert len(s) == min(rows, cols)
    u = np.linalg.qr(rng.standard_normal((rows, len(s))))[0]
    v = np.linalg.qr(rng.standard_normal((cols, len(s))))[0]
    return ((u * s) @ v.T).astype(np.float32)


def matmul_model(*weights: np.ndarray, vectors: tuple[int, ...] | None = None) -> ir.Model:
    """layer{i}: y{i} = MatMul(x{i}, W{i}) with x{i} of shape (vectors[i], rows of W{i})."""
    vectors = vectors or (1,) * len(weights)
    inputs = ", ".join(f"float[{v},{w.shape[0]}] x{i}" for i, (v, w) in enumerate(zip(vectors, weights)))
    outputs = ", ".join(f"float[{v},{w.shape[1]}] y{i}" for i, (v, w) in enumerate(zip(vectors, weights)))
    body = "\n".join(f"    [layer{i}] y{i} = MatMul(x{i}, W{i})" for i in range(len(weights)))
    text = f'<ir_version: 10, opset_import: ["" : 17]>\ng ({inputs}) => ({outputs}) {{\n{body}\n}}'
    return parse_text(text, **{f"W{i}": w for i, w in enumerate(weights)})


class Layer:
    """A weight group read with its decision in the plan under test (`decided`): the group's own fields, and
    scheme, rank, factorized, reason and reason_code from the plan."""

    def __init__(self, decided: Plan, group: WeightGroup) -> None:
        self.decided, self.group = decided, group

    def __getattr__(self, name: str):
        if name in ("scheme", "rank", "factorized", "reason", "reason_code"):
            return getattr(self.decided[self.group], name)
        return getattr(self.group, name)

    def decomposition(self, scheme):
        return self.decided.svd.decomposition(self.group, scheme)

    @property
    def decompositions(self):
        return self.decided.svd.decompositions(self.group)

    def calibrate(self, gram: np.ndarray) -> None:
        """Give the group calibration statistics (as the calibration stage returns them)."""
        self.decided.svd.refit(self.group, Statistics(gram=gram))


def groups_of(model: ir.Model, settings: Settings | None = None) -> list[Layer]:
    settings = settings or Settings.of()
    context = Context(shapes=infer_shapes(model), opset=default_opset(model))
    found = find_targets(model, settings, context)
    assert not found.skipped
    decided = Plan(found.groups, SvdCache(settings.solver))
    return [Layer(decided, group) for group in found.groups]


def unwrap(layers: list[Layer]) -> tuple[Plan, list[WeightGroup]]:
    return layers[0].decided, [layer.group for layer in layers]


def allocate(layers: list[Layer], settings: Settings, sensitivities: dict[int, float] | None = None) -> list[Layer]:
    """What plan_ranks does for a budget, minus the SVD bookkeeping: reference scheme, then allocation
    (`sensitivities`: by group id, as datafit.measure_sensitivity returns them)."""
    decided, groups = unwrap(layers)
    for group in groups:
        decided.choose(group, plan.candidate_schemes(decided, group, settings)[0])
    plan.allocate_budget(decided, groups, settings, sensitivities=sensitivities)
    return layers


def spent(groups: list[Layer], measure: str = "params") -> int:
    """Parameters (or MACs) of the plan: factor pairs where factorized, the original where dense."""
    total = 0
    for group in groups:
        scheme = group.scheme
        if group.factorized:
            total += scheme.params_after(group.rank) if measure == "params" else scheme.macs_after(group.rank)
        else:
            total += scheme.params_before if measure == "params" else scheme.macs_before
    return total


def total_before(groups: list[Layer], measure: str = "params") -> int:
    return sum(g.scheme.params_before if measure == "params" else g.scheme.macs_before for g in groups)


def next_step_cost(group: Layer) -> int:
    """Parameters the allocation's next step for a factorized group would add (more rank, or dense)."""
    scheme, rank = group.scheme, group.rank
    if rank < scheme.full_rank and scheme.gains(rank + 1):
        return scheme.params_per_rank
    return scheme.params_before - scheme.params_after(rank)


# ----------------------------------------------------------------------------- the fixture itself


def test_the_groups_see_the_chosen_spectra():
    groups = groups_of(matmul_model(spectral(SLOW, 32, 32, 0), spectral(MEDIUM[:16], 16, 48, 1)))
    for group, s in zip(groups, (SLOW, MEDIUM[:16])):
        (scheme,) = group.schemes
        np.testing.assert_allclose(group.decomposition(scheme).s[0], s, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- whole-model budget


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.5, 0.7, 0.9])
def test_the_param_budget_is_met_and_used(budget):
    weights = (spectral(SLOW, 32, 32, 0), spectral(MEDIUM[:16], 16, 48, 1), spectral(0.7 ** INDEX[:8], 64, 8, 2),
               spectral(MEDIUM[:24], 24, 24, 3))
    settings = Settings.of(param_budget=budget)
    groups = allocate(groups_of(matmul_model(*weights)), settings)
    limit = budget * total_before(groups)
    assert spent(groups) <= limit
    # Greedy stops a layer only when its next step no longer fits: no factorized layer could take one more.
    for group in groups:
        if group.factorized:
            assert group.scheme.gains(group.rank)
            assert next_step_cost(group) > limit - spent(groups), (group.lead.name, group.rank)
        else:
            assert group.reason_code == "kept_dense_by_budget"


@pytest.mark.parametrize("budget", [0.3, 0.4, 0.5])
def test_the_mac_budget_is_met_and_favours_cheap_layers(budget):
    # Layers 0 and 1 have the same spectrum; layer 0 multiplies 8 vectors, layer 1 only one.
    weights = (spectral(MEDIUM, 32, 32, 0), spectral(MEDIUM, 32, 32, 1), spectral(FAST[:16], 16, 48, 2))
    model = matmul_model(*weights, vectors=(8, 1, 4))
    groups = allocate(groups_of(model), Settings.of(mac_budget=budget))
    assert [g.scheme.macs_before for g in groups] == [8 * 1024, 1024, 4 * 768]
    assert spent(groups, "macs") <= budget * total_before(groups, "macs")
    expensive, cheap = groups[0], groups[1]
    assert expensive.factorized
    assert not cheap.factorized or cheap.rank > expensive.rank
    # By parameters the two cost the same: a parameter budget gives them the same share.
    by_params = allocate(groups_of(model), Settings.of(param_budget=budget))
    assert abs(by_params[0].rank - by_params[1].rank) <= 1


@pytest.mark.parametrize("order", ["slow-first", "fast-first"])
def test_the_slower_decaying_spectrum_gets_more_rank(order):
    spectra = (SLOW, FAST) if order == "slow-first" else (FAST, SLOW)
    groups = allocate(groups_of(matmul_model(*(spectral(s, 32, 32, i) for i, s in enumerate(spectra)))),
                      Settings.of(param_budget=0.5))
    ranks = {("slow" if s is SLOW else "fast"): g.rank for s, g in zip(spectra, groups)}
    assert all(g.factorized for g in groups)
    assert ranks["slow"] > ranks["fast"] + 4, ranks


def test_a_more_sensitive_layer_gets_more_rank():
    def ranks(sensitivities):
        groups = groups_of(matmul_model(spectral(MEDIUM, 32, 32, 0), spectral(MEDIUM, 32, 32, 1)))
        measured = {id(layer.group): sensitivity for layer, sensitivity in zip(groups, sensitivities)}
        return [g.rank for g in allocate(groups, Settings.of(param_budget=0.4), measured)]

    equal = ranks((1.0, 1.0))
    assert abs(equal[0] - equal[1]) <= 1  # the same spectrum: the same share
    plain, sensitive = ranks((1.0, 4.0))
    assert sensitive > plain + 1
    assert sum(equal) == plain + sensitive  # the same budget, moved to the sensitive layer
    # A layer whose loss does not move the outputs gets nothing beyond the starting rank.
    assert ranks((0.0, 1.0))[0] == 1


@pytest.mark.parametrize("setting, flag", [("param_budget", "--param-budget"), ("mac_budget", "--mac-budget")])
def test_a_too_small_budget_names_the_setting(setting, flag):
    groups = groups_of(matmul_model(spectral(SLOW, 32, 32, 0), spectral(MEDIUM, 32, 32, 1)))
    # Rank 1 of a 32x32 weight already keeps 64 / 1024 of its parameters (and MACs).
    with pytest.raises(OnnxlrError) as caught:
        allocate(groups, Settings.of(**{setting: 0.05}))
    assert str(caught.value).startswith(f"{setting} 0.05 is too small")
    assert caught.value.cli_message().startswith(f"{flag} 0.05 is too small")
    assert setting not in caught.value.cli_message()


def test_a_too_small_budget_counts_the_rank_multiple():
    groups = groups_of(matmul_model(spectral(SLOW, 32, 32, 0)))
    allocate(groups, Settings.of(param_budget=0.3))  # rank 1 fits
    with pytest.raises(OnnxlrError, match=r"param_budget 0\.3 is too small: rank 8 .* keeps 0\.500"):
        allocate(groups_of(matmul_model(spectral(SLOW, 32, 32, 0))), Settings.of(param_budget=0.3, rank_multiple=8))


def test_the_api_reports_a_too_small_budget_by_its_keyword():
    model = matmul_model(spectral(SLOW, 32, 32, 0))
    with pytest.raises(OnnxlrError, match="^param_budget 0.01 is too small"):
        onnxlr.optimize(model, param_budget=0.01, verify=False)


def test_layers_left_dense_carry_the_budget_reason():
    # A whole budget: every step fits, so each layer climbs to break-even and then back to dense.
    groups = allocate(groups_of(matmul_model(spectral(SLOW, 32, 32, 0), spectral(MEDIUM, 32, 32, 1))),
                      Settings.of(param_budget=1.0))
    assert [(g.factorized, g.reason_code) for g in groups] == [(False, "kept_dense_by_budget")] * 2
    assert all("--param-budget" in g.reason for g in groups)
    # A partial budget: the slow layer is worth more dense than at any rank below break-even.
    groups = allocate(groups_of(matmul_model(spectral(FAST, 32, 32, 0), spectral(SLOW, 32, 32, 1))),
                      Settings.of(param_budget=0.8))
    assert [(g.factorized, g.reason_code) for g in groups] == [(True, ""), (False, "kept_dense_by_budget")]
    assert spent(groups) <= 0.8 * total_before(groups)


def test_a_layer_without_a_gaining_rank_stays_dense():
    thin = np.random.default_rng(0).standard_normal((64, 1)).astype(np.float32)  # rank 1 keeps 65 of 64
    groups = allocate(groups_of(matmul_model(thin, spectral(SLOW, 32, 32, 1))), Settings.of(param_budget=0.5))
    assert not groups[0].scheme.gains(1)
    assert (groups[0].factorized, groups[0].reason_code) == (False, "kept_dense_by_budget")
    assert groups[1].factorized
    assert spent(groups) <= 0.5 * total_before(groups)


def test_a_layer_that_starts_dense_costs_the_others_nothing():
    thin = np.random.default_rng(0).standard_normal((64, 1)).astype(np.float32)
    with_thin = allocate(groups_of(matmul_model(thin, spectral(SLOW, 32, 32, 1))), Settings.of(param_budget=0.5))
    # The same spectrum alone, with the budget that is left once the thin layer's 64 parameters are paid.
    left = (0.5 * total_before(with_thin) - 64) / 1024
    alone = allocate(groups_of(matmul_model(spectral(SLOW, 32, 32, 1))), Settings.of(param_budget=left))
    assert with_thin[1].rank == alone[0].rank
    assert next_step_cost(with_thin[1]) > 0.5 * total_before(with_thin) - spent(with_thin)


def test_plan_ranks_with_a_budget():
    groups = groups_of(matmul_model(spectral(SLOW, 32, 32, 0), spectral(FAST, 32, 32, 1)))
    settings = Settings.of(param_budget=0.4)
    plan.plan_ranks(*unwrap(groups), settings, no_progress)
    assert all(g.factorized and g.scheme.name == "matmul" for g in groups)
    assert groups[0].rank > groups[1].rank
    assert spent(groups) <= 0.4 * total_before(groups)


# ----------------------------------------------------------------------------- candidate schemes


CONV = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[1,4,8,8] x) => (float[1,8,6,6] y) {
        [conv] y = Conv (x, K)
    }"""


def conv_group() -> Layer:
    kernel = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    model = parse_text(CONV, K=kernel)
    (group,) = groups_of(model)
    return group


def names(schemes) -> list[str]:
    return [s.name for s in schemes]


def test_candidate_schemes():
    group = conv_group()
    assert names(plan.candidate_schemes(group.decided, group.group, Settings.of())) == ["output", "input", "spatial"]
    for forced in ("output", "input", "spatial"):
        assert names(plan.candidate_schemes(group.decided, group.group, Settings.of(conv_scheme=forced))) == [forced]
    # With calibration statistics only the whitenable view competes.
    group.calibrate(np.eye(4 * 9))
    assert names(plan.candidate_schemes(group.decided, group.group, Settings.of())) == ["output"]
    assert names(plan.candidate_schemes(group.decided, group.group, Settings.of(conv_scheme="input"))) == ["input"]  # forced still wins
    # --conv-scheme is about convs: a MatMul keeps its one view.
    (matmul,) = groups_of(matmul_model(spectral(SLOW, 32, 32, 0)))
    assert names(plan.candidate_schemes(matmul.decided, matmul.group, Settings.of(conv_scheme="input"))) == ["matmul"]


def test_a_calibrated_conv_is_planned_on_the_whitened_output_view():
    group = conv_group()
    rng = np.random.default_rng(1)
    patches = rng.standard_normal((500, 4 * 9)) * np.geomspace(10, 0.1, 4 * 9)
    group.calibrate(patches.T @ patches)
    plan.plan_layer(group.decided, group.group, Settings.of(energy=0.9))
    assert group.factorized and group.scheme.name == "output"
    assert set(group.decompositions) == {"output"}  # the other views were never decomposed
    assert group.decompositions["output"].method == "whitened"


def test_auto_conv_scheme_takes_the_fewest_macs_at_equal_energy():
    group = conv_group()
    plan.plan_layer(group.decided, group.group, Settings.of(rank_ratio=0.5))
    reference = group.schemes[0]
    energy = group.decomposition(reference).retained_energy(4)
    assert group.factorized
    assert group.decomposition(group.scheme).retained_energy(group.rank) >= energy - 1e-12
    assert group.scheme.macs_after(group.rank) <= reference.macs_after(4)


# ----------------------------------------------------------------------------- per-layer planner


def planned(settings: Settings, weight: np.ndarray | None = None) -> Layer:
    (group,) = groups_of(matmul_model(weight if weight is not None else spectral(SLOW, 32, 32, 0)))
    plan.plan_layer(group.decided, group.group, settings)
    return group


def test_break_even_guard():
    # 32x32: 1024 parameters, 64 per unit of rank: rank 16 is break-even.
    assert planned(Settings.of(rank=1)).schemes[0].break_even_rank == 16
    kept = planned(Settings.of(rank=15))
    assert (kept.factorized, kept.rank, kept.reason_code) == (True, 15, "")
    for settings in (Settings.of(rank=16), Settings.of(rank_ratio=0.75)):
        group = planned(settings)
        assert not group.factorized and group.reason_code == "no_gain"
        assert "break-even 16" in group.reason
    forced = planned(Settings.of(rank_ratio=0.75, allow_no_gain=True))
    assert (forced.factorized, forced.rank) == (True, 24)


@pytest.mark.parametrize("rank, multiple, expected", [
    (5, 8, 8),  # rounded up
    (9, 4, 12),
    (13, 8, 13),  # 16 is break-even: not rounded
    (15, 4, 15),  # 16 again
    (8, 8, 8),  # already a multiple
])
def test_rank_multiple_rounds_up_but_never_to_break_even(rank, multiple, expected):
    group = planned(Settings.of(rank=rank, rank_multiple=multiple))
    assert (group.factorized, group.rank) == (True, expected)
    assert group.rank < group.scheme.break_even_rank


def test_rank_multiple_for_a_wide_weight():
    # 16x48: 768 parameters, 64 per unit of rank: break-even is 12.
    group = planned(Settings.of(rank=10, rank_multiple=4), spectral(MEDIUM[:16], 16, 48, 0))
    assert group.scheme.break_even_rank == 12
    assert (group.factorized, group.rank) == (True, 10)


def test_rank_multiple_with_allow_no_gain_may_pass_break_even():
    group = planned(Settings.of(rank=13, rank_multiple=8, allow_no_gain=True))
    assert (group.factorized, group.rank) == (True, 16)


def test_per_layer_policies_on_a_known_spectrum():
    energy = np.cumsum(MEDIUM**2) / np.sum(MEDIUM**2)
    for goal in (0.5, 0.9, 0.99):
        expected = int(np.argmax(energy >= goal)) + 1
        group = planned(Settings.of(energy=goal), spectral(MEDIUM, 32, 32, 0))
        assert group.rank == expected, goal
        assert plan.policy_rank(group.decided, group.group, group.scheme, Settings.of(energy=goal)) == expected
    assert planned(Settings.of(param_ratio=0.25)).rank == 4  # 4 x 64 = 256 = 0.25 x 1024
    assert planned(Settings.of(rank_ratio=0.25)).rank == 8
