"""WeightGroup: the targets that read one weight the same way, with their plan state and SVD cache.

The target finder (onnxlr.targets) makes the groups; the planner (onnxlr.plan) sets each group's
scheme and rank, or keeps it dense with a reason; the rewrite stage (onnxlr.rewrite) turns the plan
into factor tensors and nodes. A group is factorized once and every user is rewritten alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlr import lowrank
from onnxlr.passes import REASON_CODES, Scheme, Target


@dataclasses.dataclass
class WeightGroup:
    """Targets that read one weight the same way: factorized once, every user rewritten alike."""

    targets: list[Target]
    schemes: list[Scheme] = dataclasses.field(default_factory=list)
    decompositions: dict[str, lowrank.Decomposition] = dataclasses.field(default_factory=dict)
    scheme: Scheme | None = None
    rank: int | None = None
    reason: str = ""  # set when the group stays dense: the sentence a report shows
    reason_code: str = ""  # and its stable code (passes.base.REASON_CODES)
    gram: np.ndarray | None = None  # activation second moment (calibration): whitened SVD when set
    cross: np.ndarray | None = None  # error compensation: sum x_c x_o^T (gram is then that of x_c)
    sensitivity: float | None = None  # end-to-end output error per unit of lost (whitened) energy
    slot: int | None = None  # this weight's feed in the calibration runner (datafit)
    solver: lowrank.Solver = dataclasses.field(default_factory=lowrank.Solver)  # --svd / --device

    @property
    def lead(self) -> Target:
        return self.targets[0]

    @property
    def factorized(self) -> bool:
        """Planned to a rank and not kept dense."""
        return self.rank is not None and not self.reason

    def keep_dense(self, code: str, reason: str) -> None:
        """Leave the group's weight as it is, saying why."""
        assert code in REASON_CODES, code
        self.reason_code, self.reason = code, reason

    def clear_reason(self) -> None:
        self.reason_code, self.reason = "", ""

    def prepare_schemes(self) -> None:
        """The lead target's matrix views and costs (no SVD yet)."""
        if not self.schemes:
            self.schemes = self.lead.rule.schemes(self.lead)

    def whitens(self, scheme: Scheme) -> bool:
        """Calibration statistics apply to this view (the rule says which views take them)."""
        return self.gram is not None and scheme.whiten_side is not None

    def decomposition(self, scheme: Scheme, rank: int | None = None) -> lowrank.Decomposition:
        """The SVD of a view; with `rank`, only the leading `rank` triplets are needed (randomized may do)."""
        cached = self.decompositions.get(scheme.name)
        if cached is not None and (not cached.partial or (rank is not None and rank <= cached.full_rank)):
            return cached
        if self.whitens(scheme):
            result = lowrank.whitened_svd(scheme.matrices, self.gram, side=scheme.whiten_side, cross=self.cross)
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
