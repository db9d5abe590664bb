"""The plan stage's product: each weight group's Decision (its view and rank, or dense with a reason, or its role in
a joint pair), and the SVDs the decisions were made on.

Planning (onnxlr.factorize.plan, onnxlr.timing.latency's measured choices, the coupled pairs of onnxlr.coupled and
the data-aware search of onnxlr.factorize.pipeline) builds a `Plan`; the rewrite, the report and the metadata read
it. A Decision is immutable: planning replaces a group's decision, it never writes onto the group (groups are
read-only after selection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxlr.factorize.svd import SvdCache
from onnxlr.passes import REASON_CODES, Scheme

if TYPE_CHECKING:
    from onnxlr.factorize.groups import WeightGroup


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the plan does with one group."""

    scheme: Scheme | None = None  # the view planned (a whole-model budget sets it before the rank)
    rank: int | None = None
    reason_code: str = ""  # set when the group stays dense: its stable code (passes.base.REASON_CODES)
    reason: str = ""  # and the sentence a report shows
    joint: Any = None  # onnxlr.coupled.plans.JointRole when the layer is compressed with its coupled partner

    @property
    def factorized(self) -> bool:
        """Planned to a rank (its own factor pair) and not kept dense, nor compressed jointly with a partner."""
        return self.rank is not None and not self.reason and self.joint is None


class Plan:
    """Each group's Decision (by group) and the SvdCache behind them. A group starts as selection left it: dense
    when selection said why (`WeightGroup.excluded`), else undecided."""

    def __init__(self, groups: Iterable[WeightGroup], svd: SvdCache | None = None) -> None:
        self.svd = svd or SvdCache()
        self._decisions: dict[int, Decision] = {
            id(g): Decision(reason_code=g.excluded[0], reason=g.excluded[1]) if g.excluded else Decision()
            for g in groups}

    def __getitem__(self, group: WeightGroup) -> Decision:
        return self._decisions[id(group)]

    def _replace(self, group: WeightGroup, **changes: Any) -> None:
        self._decisions[id(group)] = dataclasses.replace(self._decisions[id(group)], **changes)

    def choose(self, group: WeightGroup, scheme: Scheme, rank: int | None = None) -> None:
        """Plan the group at `scheme` (and `rank`; a budget's first pass sets the view alone)."""
        self._replace(group, scheme=scheme, rank=rank)

    def set_rank(self, group: WeightGroup, rank: int) -> None:
        self._replace(group, rank=rank)

    def keep_dense(self, group: WeightGroup, code: str, reason: str) -> None:
        """Leave the group's weight as it is, saying why."""
        assert code in REASON_CODES, code
        self._replace(group, reason_code=code, reason=reason)

    def set_joint(self, group: WeightGroup, role: Any) -> None:
        """Compress the group with its coupled partner (`role`: a JointRole), or not (None); taking a role clears
        a reason to stay dense."""
        self._replace(group, joint=role, **({"reason_code": "", "reason": ""} if role is not None else {}))

    def factorized(self, group: WeightGroup) -> bool:
        return self[group].factorized

    def snapshot(self) -> Mapping[int, Decision]:
        return dict(self._decisions)

    def restore(self, snapshot: Mapping[int, Decision]) -> None:
        """Back to `snapshot`'s scheme, rank and reason for every group; joint roles stay as they are (a pair
        resets its own: PairPlan.reset)."""
        for key, decision in snapshot.items():
            self._decisions[key] = dataclasses.replace(decision, joint=self._decisions[key].joint)

    def planned_weight(self, group: WeightGroup) -> np.ndarray:
        """The product of a factorized group's planned factors, as the weight its nodes read (calibration feeds)."""
        decision = self[group]
        assert decision.scheme is not None and decision.rank is not None  # planned
        return self.svd.dense_weight(group, decision.scheme, decision.rank)
