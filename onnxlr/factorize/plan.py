"""Plan ranks: for each weight group, the scheme (matrix view) and rank the rank policy gives, or dense.

Per-layer policies (--rank-ratio, --rank, --energy, --param-ratio) plan each group on its own;
whole-model budgets (--param-budget, --mac-budget) allocate ranks across all groups greedily on
retained energy per parameter (or MAC), weighted by measured sensitivity when calibration ran.
A plan whose factor pair is not smaller and cheaper than the original stays dense (break-even).
With --objective latency (a `clock`, onnxlr.timing.latency) every candidate pair is timed against its original
node: only pairs measured faster are planned, per-layer ranks round up to vector multiples when that is
faster, and budgets allocate over each layer's faster ranks (a --latency-budget with measured time as cost).
The planner asks each scheme what it costs and whether calibration can whiten it; it never asks
which op a group came from.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Protocol

from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank
from onnxlr.factorize.decisions import Plan
from onnxlr.factorize.groups import WeightGroup
from onnxlr.passes import Scheme
from onnxlr.policies import LayerPolicy
from onnxlr.settings import Progress, Settings
from onnxlr.timing import latency
from onnxlr.timing.measured import MARGIN, Measured


class JointUnit(Protocol):
    """A coupled pair a whole-model budget may compress jointly (onnxlr.coupled.plans.PairPlan): it keeps
    `keep` of its `width` inner neurons instead of giving its layers (`groups`) ranks of their own."""

    groups: list[WeightGroup]
    width: int
    keep: int | None

    def cost(self, keep: int, measure: str) -> float: ...  # parameters or MACs of its layers at `keep`

    def loss(self, keep: int) -> float: ...  # predicted model output error (sensitivity-weighted)


def plan_ranks(plan: Plan, groups: list[WeightGroup], settings: Settings, progress: Progress,
               units: Sequence[JointUnit] = (), clock: latency.Clock | None = None,
               sensitivities: Mapping[int, float] | None = None) -> None:
    """Choose each group's scheme and rank in `plan` (or leave it dense with a reason); with a budget, `units`
    (coupled pairs) compete for it too, each setting its `keep`. `clock`: plan by measured latency."""
    active = [g for g in groups if not plan[g].reason]
    if settings.budget is not None:
        held = 0
        for group in progress(active, "SVD"):
            scheme = candidate_schemes(plan, group, settings)[0]
            plan.choose(group, scheme)
            decomposition = plan.svd.decomposition(group, scheme)
            held += _vector_bytes(decomposition)
            if not plan.svd.calibrated(group) and held > PLANNING_VECTOR_BYTES:
                # Allocation needs every spectrum, not the vectors: past the limit, free them so a large
                # model's planning holds one layer's SVD at a time (the rewrite computes it again, with
                # the same result). Calibrated groups keep theirs: sensitivity, compensation and the
                # target search feed their products many times.
                held -= _vector_bytes(decomposition)
                plan.svd.drop_vectors(group)
        if clock is not None:
            latency.prepare_ladders(plan, active, lambda g: candidate_schemes(plan, g, settings),
                                    settings.rank_multiple, settings.budget[0], clock, progress)
            in_units = {id(g) for unit in units for g in unit.groups}  # by identity: groups hold arrays
            active = [g for g in active if not plan[g].reason or id(g) in in_units]
        allocate_budget(plan, active, settings, units, clock.measured if clock is not None else None, sensitivities)
        for group in active:
            if plan.factorized(group):
                apply_break_even(plan, group, settings)
    else:
        unknown = []
        for group in progress(active, "SVD" if clock is None else "SVD and timing"):
            try:
                plan_layer(plan, group, settings, clock)
            except latency.UnknownDims as exc:
                unknown.append(f"{group.lead.name}: {exc}")
                plan.keep_dense(group, "not_timed", f"not timed: {exc}")
            except latency.NotTimed as exc:
                plan.keep_dense(group, "not_timed", f"not timed: {exc}")
        latency.check_timed(unknown, active, clock.dynamic_inputs if clock is not None else ())


# Singular vectors that whole-model planning may keep for the rewrite; beyond, they are recomputed.
PLANNING_VECTOR_BYTES = 256 << 20


def _vector_bytes(decomposition: lowrank.Decomposition) -> int:
    return sum(v.nbytes for v in (decomposition.u, decomposition.vt) if v is not None)


def plan_layer(plan: Plan, group: WeightGroup, settings: Settings, clock: latency.Clock | None = None) -> None:
    """A per-layer policy's scheme and final rank for one group (an SVD only where the policy needs a spectrum)."""
    _plan_group(plan, group, settings, clock)
    if plan.factorized(group):
        apply_break_even(plan, group, settings)


def candidate_schemes(plan: Plan, group: WeightGroup, settings: Settings) -> list[Scheme]:
    """The views a plan may choose from; the first is the reference the policy's rank is taken on.

    A forced --conv-scheme is the only candidate. With calibration statistics only the views that
    can be whitened compete: whitened and plain energies are not comparable.
    """
    by_name = {s.name: s for s in group.schemes}
    if settings.conv_scheme != "auto" and settings.conv_scheme in by_name:
        return [by_name[settings.conv_scheme]]
    whitenable = [s for s in group.schemes if s.whiten_side is not None]
    if plan.svd.calibrated(group) and whitenable:
        return whitenable[:1]
    return group.schemes


def policy_rank(plan: Plan, group: WeightGroup, scheme: Scheme, settings: Settings) -> int:
    """The rank a per-layer policy gives one view (before rounding and the break-even guard)."""
    assert isinstance(settings.policy, LayerPolicy), settings.policy
    return settings.policy.rank(scheme, lambda: plan.svd.decomposition(group, scheme))


def _plan_group(plan: Plan, group: WeightGroup, settings: Settings, clock: latency.Clock | None = None) -> None:
    """Rank by the policy on the reference scheme; several candidates: the fewest MACs at equal error
    (with a clock: the fastest pair measured, each rank or its round-up to a vector multiple)."""
    candidates = candidate_schemes(plan, group, settings)
    reference = candidates[0]
    rank = policy_rank(plan, group, reference, settings)
    if len(candidates) == 1:
        plan.choose(group, reference, rank)
        if clock is not None:
            latency.choose_fastest(plan, group, [(reference, rank)], settings.rank_multiple, clock, _fits(settings))
        return
    # "Same error": every scheme views the same kernel, so the Frobenius error of the kernel is
    # comparable; each other scheme gets the smallest rank that keeps at least the same energy.
    target_energy = plan.svd.decomposition(group, reference).retained_energy(rank)
    options = [(reference.macs_after(rank), 0, reference, rank)]
    for order, scheme in enumerate(candidates[1:], start=1):
        scheme_rank = lowrank.rank_for_energy(plan.svd.decomposition(group, scheme), target_energy)
        bound = settings.policy.fraction_bound
        if bound is not None and scheme.params_after(scheme_rank) > bound * scheme.params_before:
            continue
        options.append((scheme.macs_after(scheme_rank), order, scheme, scheme_rank))
    _, _, best_scheme, best_rank = min(options, key=lambda o: (o[0], o[1]))
    plan.choose(group, best_scheme, best_rank)
    if clock is not None:
        preferred = sorted(options, key=lambda o: (o[0], o[1]))  # the size objective's order
        latency.choose_fastest(plan, group, [(scheme, rank) for _, _, scheme, rank in preferred], settings.rank_multiple,
                               clock, _fits(settings))


def _fits(settings: Settings):
    """Whether a rank rounded up for speed still keeps within --param-ratio (the other policies set no bound)."""
    bound = settings.policy.fraction_bound
    if bound is None:
        return None
    return lambda scheme, rank: scheme.params_after(rank) <= bound * scheme.params_before


def apply_break_even(plan: Plan, group: WeightGroup, settings: Settings) -> None:
    scheme, rank = plan[group].scheme, plan[group].rank
    assert scheme is not None and rank is not None
    limit = min(scheme.break_even_rank, scheme.full_rank + 1)
    if settings.rank_multiple > 1:
        rank = lowrank.round_to_multiple(rank, settings.rank_multiple, limit if not settings.allow_no_gain
                                         else scheme.full_rank + 1)
    plan.set_rank(group, rank)
    if not settings.allow_no_gain and not scheme.gains(rank):
        plan.keep_dense(group, "no_gain", f"no gain: rank {rank} >= break-even {scheme.break_even_rank}")


def allocate_budget(plan: Plan, groups: list[WeightGroup], settings: Settings, units: Sequence[JointUnit] = (),
                    measured: Measured | None = None, sensitivities: Mapping[int, float] | None = None) -> None:
    """Global ranks so the targets together keep <= the budget of their parameters (or MACs).

    Greedy on marginal value: start every layer at rank 1 (or the rank multiple), then repeatedly
    grant the step (more rank, or going back to dense past break-even) that recovers the most
    relative energy per parameter (or MAC), while it fits the budget; with measured sensitivities,
    energy is weighted by how much each layer's loss moves the model's outputs. Singular values
    decrease, so the marginal value of each layer's steps decreases too and greedy is close to optimal.

    A joint unit takes its layers' place: it starts at the rank multiple of neurons and its steps
    add neurons, valued by the output error they win back (unit.loss), up to all of them (exact).
    Its layers are left unplanned (rank None); onnxlr.coupled.plans settles them.

    A --latency-budget prices a unit by its layers' measured original times at its kept share of their MACs (a
    narrowed pair adds no node); a layer of a pair that could not be timed stays dense and counts for nothing,
    and a pair with no timed layer keeps all of its neurons.
    """
    assert settings.budget is not None
    measure, fraction = settings.budget
    measured = measured or Measured()  # --objective latency: the clock's (timings, prepare_ladders' ladders)

    flag = {"params": "--param-budget", "macs": "--mac-budget", "latency": "--latency-budget"}[measure]
    if measure == "latency":
        if any(measured.ladder(g) is None and not plan[g].reason for g in groups):
            raise OnnxlrError("{0} needs every layer timed first (--objective latency)", "latency_budget")
        # A layer that could not be timed (`not_timed`: only a coupled pair's layer gets here) has no measured
        # time to spend: it stays dense, and counts for nothing (as every untimed layer under the objective).
        groups = [g for g in groups if measured.ladder(g) is not None]

    def before(group: WeightGroup) -> float:
        if measure == "latency":  # an untimed layer of a coupled pair counts for nothing
            return measured.original_ms(group)
        scheme = plan[group].scheme
        assert scheme is not None  # every group allocated here has its scheme (plan_ranks, prepare_ladders)
        return scheme.params_before if measure == "params" else scheme.macs_before

    def after(group: WeightGroup, rank: int) -> float:
        scheme = plan[group].scheme
        assert scheme is not None
        if measure == "latency":
            return measured.pair_ms(group, scheme, rank)
        return scheme.params_after(rank) if measure == "params" else scheme.macs_after(rank)

    def unit_cost(unit: JointUnit, keep: int) -> float:
        if measure != "latency":
            return unit.cost(keep, measure)
        # A pair only narrows dense layers (no new node): its time is taken to scale with its MACs.
        original = sum(measured.original_ms(g) for g in unit.groups)
        return original * unit.cost(keep, "macs") / max(unit.cost(unit.width, "macs"), 1e-30)

    total_before = sum(before(g) for g in groups)
    # A unit's cost counts its biases as its report rows do (an Add bias shrinks with the neurons too).
    total_before += sum(unit_cost(unit, unit.width) - sum(before(g) for g in unit.groups) for unit in units)
    budget = fraction * total_before
    in_units = {id(g) for unit in units for g in unit.groups}
    groups = [g for g in groups if id(g) not in in_units]
    step = settings.rank_multiple
    spent = 0.0
    state: dict[int, int] = {}  # group index -> rank (0 means dense); len(groups) + i -> unit i's neurons
    for index, group in enumerate(groups):
        ladder = measured.ladder(group)
        if ladder is not None:  # measured: only its faster ranks
            rank = ladder[0] if ladder else 0
        else:
            scheme = plan[group].scheme
            assert scheme is not None
            rank = min(step, scheme.full_rank)
            # A layer with no gaining rank at all (a 64x1 weight: rank 1 keeps 65 of 64) can only stay dense.
            rank = rank if scheme.gains(rank) else 0
        state[index] = rank
        spent += after(group, rank) if rank else before(group)
    for offset, unit in enumerate(units):
        # A pair that costs nothing (none of its layers timed: nothing to price its narrowing by) keeps all of
        # its neurons, as its untimed layers would stay dense on their own.
        state[len(groups) + offset] = unit.width if unit_cost(unit, unit.width) <= 0 else min(step, unit.width)
        spent += unit_cost(unit, state[len(groups) + offset])
    if spent > budget:
        smallest = "the lowest rank measured faster" if any(measured.ladder(g) is not None for g in groups) else f"rank {step}"
        slower = sum(measured.ladder(g) == [] for g in groups)
        if slower:
            smallest += (f" (and {slower} of the {len(groups)} layers have no factor pair measured faster at all: a "
                         f"--latency-budget, or --objective size, plans without that limit)")
        raise OnnxlrError(
            f"{{0}} {fraction} is too small: {smallest} in every layer that can be "
            f"factorized already keeps {spent / max(total_before, 1e-30):.3f} of the {measure}", settings.budget_setting
        )
    heap: list[tuple[float, int, int, float]] = []  # (-value per param, index, new rank, cost)

    def push_group(index: int) -> None:
        group, rank = groups[index], state[index]
        if rank == 0:  # dense already (it started so, or went back): nothing left to grant, nothing to charge
            return
        scheme = plan[group].scheme
        assert scheme is not None
        decomposition = plan.svd.decomposition(group, scheme)
        current_loss = 1.0 - decomposition.retained_energy(rank)
        ladder = measured.ladder(group)
        if ladder is not None:
            position = ladder.index(rank) + 1
            new_rank = ladder[position] if position < len(ladder) else rank
        else:
            new_rank = min(rank + step, scheme.full_rank)
        if new_rank == rank or not scheme.gains(new_rank):
            new_rank, gain, cost = 0, current_loss, before(group) - after(group, rank)
        else:
            gain = decomposition.retained_energy(new_rank) - decomposition.retained_energy(rank)
            cost = after(group, new_rank) - after(group, rank)
        sensitivity = (sensitivities or {}).get(id(group))
        if sensitivity is not None:  # measured: energy counts by how much it moves the outputs
            gain *= sensitivity
        if cost <= 0 or gain <= 0:
            return
        heapq.heappush(heap, (-gain / cost, index, new_rank, cost))

    def push_unit(index: int) -> None:
        unit, keep = units[index - len(groups)], state[index]
        new_keep = min(keep + step, unit.width)
        gain, cost = unit.loss(keep) - unit.loss(new_keep), unit_cost(unit, new_keep) - unit_cost(unit, keep)
        if new_keep > keep and cost > 0 and gain > 0:
            heapq.heappush(heap, (-gain / cost, index, new_keep, cost))

    def push(index: int) -> None:
        (push_group if index < len(groups) else push_unit)(index)

    for index in state:
        push(index)
    while heap:
        _, index, new_rank, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer's later steps need this one first: it stops here
        spent += cost
        state[index] = new_rank
        if new_rank:
            push(index)
    for index, group in enumerate(groups):
        if state[index] == 0 and measured.ladder(group) == []:
            plan.keep_dense(group, "not_faster", f"no factor pair measured {MARGIN:.0%} faster than the original "
                                           f"({measured.original_ms(group):.3f} ms)")
        elif state[index] == 0:
            plan.keep_dense(group, "kept_dense_by_budget", f"kept dense by the {flag} allocation")
        else:
            plan.set_rank(group, state[index])
    for offset, unit in enumerate(units):
        unit.keep = state[len(groups) + offset]

