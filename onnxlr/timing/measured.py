"""What the latency stage measured: each weight group's times (LayerTiming: the original node and its factor pairs by
scheme and rank) and, under a budget, its ladder of ranks measured faster. The stage's Clock (onnxlr.timing.latency)
owns a `Measured`; planning (onnxlr.factorize.plan) and the report (onnxlr.factorize.results) read it. The groups
carry none of it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxlr.factorize.groups import WeightGroup
    from onnxlr.passes import Scheme

MARGIN = 0.05  # a pair must measure at least 5% faster than its original node to be kept
# ... and save at least this much: a few microseconds measured in isolation do not survive in a whole model (its
# extra intermediate tensor and kernel dispatch), nor this machine's noise.
MIN_SAVING_MS = 0.005


@dataclasses.dataclass
class Measured:
    """What the latency stage measured, by weight group: each group's LayerTiming and, under a budget, its ladder
    (the ranks measured faster, ascending). The stage (its Clock) owns it; planning and the report read it, and the
    groups carry none of it."""

    timings: dict[int, LayerTiming] = dataclasses.field(default_factory=dict)  # id(group) ->
    ladders: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # id(group) ->

    def timing(self, group: WeightGroup) -> LayerTiming | None:
        return self.timings.get(id(group))

    def ladder(self, group: WeightGroup) -> list[int] | None:
        return self.ladders.get(id(group))

    def original_ms(self, group: WeightGroup) -> float:
        """The group's original time; 0.0 when it was not timed (it counts for nothing in a latency budget)."""
        timing = self.timing(group)
        return timing.original_ms if timing is not None else 0.0

    def pair_ms(self, group: WeightGroup, scheme: Scheme, rank: int) -> float:
        """The group's factor pair at `rank` of its planned `scheme`: a rank on its ladder, so measured."""
        timing = self.timing(group)
        assert timing is not None
        ms = timing.ms(scheme, rank)
        assert ms is not None
        return ms


@dataclasses.dataclass
class LayerTiming:
    """One weight group's measured times (summed over its readers): the original, and pairs by (scheme, rank)."""

    original_ms: float
    pair_ms: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)

    def ms(self, scheme: Scheme, rank: int) -> float | None:
        return self.pair_ms.get((scheme.name, rank))

    def faster(self, scheme: Scheme, rank: int) -> bool:
        """The pair measured at least MARGIN (and MIN_SAVING_MS) faster than the original."""
        ms = self.ms(scheme, rank)
        return ms is not None and measurably_faster(ms, self.original_ms)


def measurably_faster(ms: float, than_ms: float) -> bool:
    return ms * (1 + MARGIN) <= than_ms and than_ms - ms >= MIN_SAVING_MS
