"""The SVDs a plan is made on: each weight group's calibration statistics (a stage's result) and a cache of its
views' decompositions.

The calibration stage (onnxlr.calibrate.datafit.prepare, or onnxlr.factorize.targets.attach_statistics for given
Grams) returns `Statistics` by group; planning, the rewrite and the report ask an `SvdCache` for decompositions,
factors and products. The groups carry none of it (they are read-only after selection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from onnxlr.factorize import lowrank

if TYPE_CHECKING:
    from onnxlr.factorize.groups import WeightGroup
    from onnxlr.passes import Scheme


@dataclasses.dataclass(frozen=True)
class Statistics:
    """What calibration measured at one group's input."""

    gram: np.ndarray | None = None  # activation second moment: whitened SVD when set
    cross: np.ndarray | None = None  # error compensation: sum x_c x_o^T (gram is then that of x_c)
    row_weights: np.ndarray | None = None  # an embedding table's: occurrences of each id + 1
    # (sum of x: (groups, K), count) on the calibration data, beside the original gram (joint pairs use both).
    input_moments: tuple[np.ndarray, int] | None = None

    @property
    def original_moments(self) -> bool:
        """The original input's Gram and sum of one group (not compensated): what a joint pair's refit reads."""
        return (self.input_moments is not None and self.gram is not None and self.cross is None
                and self.gram.ndim == 2)


NO_STATISTICS = Statistics()


class SvdCache:
    """Each group's decompositions by view (scheme name), computed on demand with its statistics and `solver`."""

    def __init__(self, solver: lowrank.Solver | None = None, statistics: Mapping[int, Statistics] | None = None
                 ) -> None:
        self.solver = solver or lowrank.Solver()
        self._statistics: dict[int, Statistics] = dict(statistics or {})  # id(group) ->
        self._decompositions: dict[int, dict[str, lowrank.Decomposition]] = {}  # id(group) -> scheme name ->

    def statistics(self, group: WeightGroup) -> Statistics:
        return self._statistics.get(id(group), NO_STATISTICS)

    def calibrated(self, group: WeightGroup) -> bool:
        """The group has a Gram: only the views that can be whitened compete in its plan."""
        return self.statistics(group).gram is not None

    def refit(self, group: WeightGroup, statistics: Statistics) -> None:
        """New statistics for a group (error compensation's): its decompositions are computed again on them."""
        self._statistics[id(group)] = statistics
        self._decompositions.pop(id(group), None)

    def whitens(self, group: WeightGroup, scheme: Scheme) -> bool:
        """Calibration statistics apply to this view (the rule says which views take them)."""
        return self.calibrated(group) and scheme.whiten_side is not None

    def decompositions(self, group: WeightGroup) -> Mapping[str, lowrank.Decomposition]:
        """The views decomposed so far (the report reads their spectra)."""
        return self._decompositions.get(id(group), {})

    def decomposition(self, group: WeightGroup, scheme: Scheme, rank: int | None = None) -> lowrank.Decomposition:
        """The SVD of a view; with `rank`, only the leading `rank` triplets are needed (randomized may do)."""
        cache = self._decompositions.setdefault(id(group), {})
        cached = cache.get(scheme.name)
        if cached is not None and (not cached.partial or (rank is not None and rank <= cached.full_rank)):
            return cached
        statistics = self.statistics(group)
        if statistics.row_weights is not None and scheme.size_only:
            result = lowrank.row_weighted_svd(scheme.matrices, statistics.row_weights)
        elif statistics.gram is not None and scheme.whiten_side is not None:
            result = lowrank.whitened_svd(scheme.matrices, statistics.gram, side=scheme.whiten_side,
                                          cross=statistics.cross, rank=rank, solver=self.solver)
        else:
            result = lowrank.decompose(scheme.matrices, rank, self.solver)
        cache[scheme.name] = result
        return result

    def factors(self, group: WeightGroup, scheme: Scheme, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The rank-`rank` factor pair of a view, computing the SVD again if planning freed its vectors."""
        decomposition = self.decomposition(group, scheme, rank)
        if decomposition.u is None:  # freed after planning (budgets): the same SVD again, the same result
            del self._decompositions[id(group)][scheme.name]
            decomposition = self.decomposition(group, scheme, None if decomposition.solver != "randomized" else rank)
        return decomposition.factors(rank)

    def drop_vectors(self, group: WeightGroup) -> None:
        """Free the singular vectors once the factors are out; spectra stay for the report."""
        for decomposition in self.decompositions(group).values():
            decomposition.drop_vectors()

    def dense_weight(self, group: WeightGroup, scheme: Scheme, rank: int) -> np.ndarray:
        """The product of the rank-`rank` factors, as the weight the nodes read (for calibration feeds)."""
        a, b = self.factors(group, scheme, rank)
        dense = group.lead.rule.dense_weight(group.lead, scheme, np.matmul(a, b))
        return np.ascontiguousarray(dense.astype(group.lead.array.dtype))
