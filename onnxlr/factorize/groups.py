"""WeightGroup: every reader of one stored weight, with the plan state and SVD cache.

The target finder (onnxlr.factorize.targets) makes the groups; the planner (onnxlr.factorize.plan) sets each group's
scheme and rank, or keeps it dense with a reason; the rewrite stage (onnxlr.factorize.rewrite) turns the plan
into factor tensors and nodes. A group is factorized once and every reader is rewritten with its factors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from onnxlr.factorize import lowrank
from onnxlr.passes import REASON_CODES, Scheme, Target
from onnxlr.passes.weights import constant_weight


@dataclasses.dataclass
class WeightGroup:
    """Every reader of one stored weight (through any views of it): factorized once, every reader rewritten
    with the same factor pair (transposed for a reader that sees the transpose)."""

    targets: list[Target]  # every reader of the weight; the first (a rule's target) leads: its schemes are planned
    # Per target: True when it reads the transpose of the lead's matrix (a tied head's Eᵀ): it takes Bᵀ·Aᵀ.
    flipped: list[bool] = dataclasses.field(default_factory=list)
    schemes: list[Scheme] = dataclasses.field(default_factory=list)  # the lead's views, costs summed over readers
    reader_options: list[list[Scheme]] = dataclasses.field(default_factory=list)  # per target: its own views
    # Per target: its bias tensors (rule.fixed_inputs) as (id of the stored tensor, parameters), taken
    # before the rewrite: a bias shared through Identity counts once.
    biases: list[list[tuple[int, int]]] = dataclasses.field(default_factory=list)
    decompositions: dict[str, lowrank.Decomposition] = dataclasses.field(default_factory=dict)
    scheme: Scheme | None = None
    rank: int | None = None
    reason: str = ""  # set when the group stays dense: the sentence a report shows
    reason_code: str = ""  # and its stable code (passes.base.REASON_CODES)
    gram: np.ndarray | None = None  # activation second moment (calibration): whitened SVD when set
    cross: np.ndarray | None = None  # error compensation: sum x_c x_o^T (gram is then that of x_c)
    row_weights: np.ndarray | None = None  # an embedding table's: occurrences of each id + 1 (calibration)
    # (sum of x: (groups, K), count) on the calibration data, beside the original gram (joint pairs use both).
    input_moments: tuple[np.ndarray, int] | None = None
    joint: Any = None  # onnxlr.coupled.plans.JointRole when the group's layer is compressed with its coupled partner
    slot: int | None = None  # this weight's feed in the calibration runner (datafit)
    solver: lowrank.Solver = dataclasses.field(default_factory=lowrank.Solver)  # --svd / --device

    def __post_init__(self) -> None:
        self.flipped = self.flipped or [False] * len(self.targets)

    @property
    def lead(self) -> Target:
        return self.targets[0]

    @property
    def factorized(self) -> bool:
        """Planned to a rank (its own factor pair) and not kept dense, nor compressed jointly with a partner."""
        return self.rank is not None and not self.reason and self.joint is None

    def keep_dense(self, code: str, reason: str) -> None:
        """Leave the group's weight as it is, saying why."""
        assert code in REASON_CODES, code
        self.reason_code, self.reason = code, reason

    def clear_reason(self) -> None:
        self.reason_code, self.reason = "", ""

    @property
    def uniform(self) -> bool:
        """Every reader reads the weight as the lead does (the same rule and view, not transposed):
        calibration can feed them one weight and sum their statistics."""
        return all(type(t.rule) is type(self.lead.rule) and t.view == self.lead.view and not flip
                   for t, flip in zip(self.targets, self.flipped))

    def prepare_schemes(self) -> None:
        """The lead's matrix views (no SVD yet), with the costs of every reader: the weight's parameters
        count once, each reader's MACs add, and so does each bias (once, however many read it)."""
        if self.schemes:
            return
        self.reader_options = [t.rule.schemes(t) for t in self.targets]
        self.biases = [_bias_tensors(t) for t in self.targets]
        counted: set[int] = set()
        repeated = [repeated_params(biases, counted) for biases in self.biases]
        self.schemes = [_with_readers(scheme, [_matching(scheme, options) for options in self.reader_options[1:]],
                                      sum(repeated[1:])) for scheme in self.reader_options[0]]

    def reader_scheme(self, index: int) -> Scheme | None:
        """Target `index`'s own costs under the group's scheme (its first view before planning)."""
        if not self.reader_options:
            return None
        return _matching(self.scheme or self.schemes[0], self.reader_options[index])

    def reader_view(self, index: int, scheme: Scheme) -> Scheme:
        """Target `index`'s own costs under the lead's view `scheme` (the view itself before schemes are prepared)."""
        return _matching(scheme, self.reader_options[index]) if self.reader_options else scheme

    def whitens(self, scheme: Scheme) -> bool:
        """Calibration statistics apply to this view (the rule says which views take them)."""
        return self.gram is not None and scheme.whiten_side is not None

    def decomposition(self, scheme: Scheme, rank: int | None = None) -> lowrank.Decomposition:
        """The SVD of a view; with `rank`, only the leading `rank` triplets are needed (randomized may do)."""
        cached = self.decompositions.get(scheme.name)
        if cached is not None and (not cached.partial or (rank is not None and rank <= cached.full_rank)):
            return cached
        if self.row_weights is not None and scheme.size_only:
            result = lowrank.row_weighted_svd(scheme.matrices, self.row_weights)
        elif self.whitens(scheme):
            assert self.gram is not None and scheme.whiten_side is not None  # whitens() checked both
            result = lowrank.whitened_svd(scheme.matrices, self.gram, side=scheme.whiten_side, cross=self.cross,
                                          rank=rank, solver=self.solver)
        else:
            result = lowrank.decompose(scheme.matrices, rank, self.solver)
        self.decompositions[scheme.name] = result
        return result

    def factors(self, scheme: Scheme, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The rank-`rank` factor pair of a view, computing the SVD again if planning freed its vectors."""
        decomposition = self.decomposition(scheme, rank)
        if decomposition.u is None:  # freed after planning (budgets): the same SVD again, the same result
            del self.decompositions[scheme.name]
            decomposition = self.decomposition(scheme, None if decomposition.solver != "randomized" else rank)
        return decomposition.factors(rank)

    def drop_vectors(self) -> None:
        """Free the singular vectors once the factors are out; spectra stay for the report."""
        for decomposition in self.decompositions.values():
            decomposition.drop_vectors()

    def dense_weight(self, scheme: Scheme, rank: int) -> np.ndarray:
        """The product of the rank-`rank` factors, as the weight the nodes read (for calibration feeds)."""
        a, b = self.factors(scheme, rank)
        dense = self.lead.rule.dense_weight(self.lead, scheme, np.matmul(a, b))
        return np.ascontiguousarray(dense.astype(self.lead.array.dtype))

    def planned_weight(self) -> np.ndarray:
        """dense_weight at the planned scheme and rank (a factorized group's)."""
        assert self.scheme is not None and self.rank is not None  # planned
        return self.dense_weight(self.scheme, self.rank)


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
