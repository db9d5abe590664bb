"""WeightGroup: every reader of one stored weight, with its matrix views and their costs.

The target finder (onnxlr.factorize.targets) makes the groups, read-only from then on; the planner
(onnxlr.factorize.plan) returns each group's decision (onnxlr.factorize.decisions: scheme and rank, or dense with
a reason) made on the SVDs of onnxlr.factorize.svd; the rewrite stage (onnxlr.factorize.rewrite) turns the plan
into factor tensors and nodes. A group is factorized once and every reader is rewritten with its factors.
"""

from __future__ import annotations

import dataclasses

from onnxlr.passes import REASON_CODES, Scheme, Target
from onnxlr.passes.weights import constant_weight


@dataclasses.dataclass(frozen=True, eq=False)
class WeightGroup:
    """Every reader of one stored weight (through any views of it): factorized once, every reader rewritten
    with the same factor pair (transposed for a reader that sees the transpose). Read-only once selected
    (`WeightGroup.of`): stages return their results by group (statistics, timings, the plan) instead."""

    targets: list[Target]  # every reader of the weight; the first (a rule's target) leads: its schemes are planned
    # Per target: True when it reads the transpose of the lead's matrix (a tied head's Eᵀ): it takes Bᵀ·Aᵀ.
    flipped: list[bool]
    schemes: list[Scheme]  # the lead's views (no SVD yet), costs summed over readers
    reader_options: list[list[Scheme]]  # per target: its own views
    # Per target: its bias tensors (rule.fixed_inputs) as (id of the stored tensor, parameters), taken
    # before the rewrite: a bias shared through Identity counts once.
    biases: list[list[tuple[int, int]]]
    excluded: tuple[str, str] | None = None  # (code, reason) when selection keeps it dense (--min-params)

    @classmethod
    def of(cls, targets: list[Target], flipped: list[bool] | None = None,
           excluded: tuple[str, str] | None = None) -> WeightGroup:
        """The group of `targets` with the lead's matrix views and the costs of every reader: the weight's
        parameters count once, each reader's MACs add, and so does each bias (once, however many read it)."""
        assert excluded is None or excluded[0] in REASON_CODES, excluded
        reader_options = [t.rule.schemes(t) for t in targets]
        biases = [_bias_tensors(t) for t in targets]
        counted: set[int] = set()
        repeated = [repeated_params(tensors, counted) for tensors in biases]
        schemes = [_with_readers(scheme, [_matching(scheme, options) for options in reader_options[1:]],
                                 sum(repeated[1:])) for scheme in reader_options[0]]
        return cls(targets=list(targets), flipped=list(flipped or [False] * len(targets)), schemes=schemes,
                   reader_options=reader_options, biases=biases, excluded=excluded)

    @property
    def lead(self) -> Target:
        return self.targets[0]

    @property
    def uniform(self) -> bool:
        """Every reader reads the weight as the lead does (the same rule and view, not transposed):
        calibration can feed them one weight and sum their statistics."""
        return all(type(t.rule) is type(self.lead.rule) and t.view == self.lead.view and not flip
                   for t, flip in zip(self.targets, self.flipped))

    def reader_scheme(self, index: int, scheme: Scheme | None) -> Scheme:
        """Target `index`'s own costs under the lead's view `scheme` (its first view when none is planned)."""
        return _matching(scheme or self.schemes[0], self.reader_options[index])


def _matching(scheme: Scheme, options: list[Scheme]) -> Scheme:
    """The reader's view of the same name (a conv read alike), else its only one (a matrix's)."""
    return next((option for option in options if option.name == scheme.name), options[0])


def _with_readers(scheme: Scheme, readers: list[Scheme], repeated_fixed: int) -> Scheme:
    extra_fixed = sum(r.fixed_params for r in readers) - repeated_fixed
    return dataclasses.replace(
        scheme,
        params_before=scheme.params_before + extra_fixed,
        fixed_params=scheme.fixed_params + extra_fixed,
        macs_before=scheme.macs_before + sum(r.macs_before for r in readers),
        macs_per_rank=scheme.macs_per_rank + sum(r.macs_per_rank for r in readers),
    )


def _bias_tensors(target: Target) -> list[tuple[int, int]]:
    found = []
    for value in target.rule.fixed_inputs(target):
        weight = constant_weight(value, inputs_as_constants=target.context.inputs_as_constants)
        if weight.array is not None and weight.sources:
            found.append((id(weight.sources[0]), int(weight.array.size)))
    return found


def repeated_params(tensors: list[tuple[int, int]], counted: set[int]) -> int:
    """Parameters of `tensors` ((id, size) pairs) already in `counted`; adds the others to it."""
    repeated = sum(size for key, size in tensors if key in counted)
    counted.update(key for key, _ in tensors)
    return repeated
