"""Rank policies: how each layer's rank is chosen. One class a policy, each declaring its keyword (the CLI flag with
dashes), its help, its validation and what it computes; `Settings.policy` holds one of them.

Three kinds, which the planner (onnxlr.factorize.plan, onnxlr.factorize.pipeline) tells apart by type:
- `LayerPolicy`: each layer on its own (`rank` of one matrix view).
- `Budget`: the whole model keeps at most a fraction of a measure (parameters, MACs, measured time), allocated greedily.
- `Goal`: an end-to-end target on held-out outputs, met by searching a parameter budget (onnxlr.calibrate.datafit).

Adding a policy is one class here (registered in POLICIES) plus its tests: the Python keyword, the CLI flag, its help,
the settings recorded in a written model and the CLI reference are derived from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank

if TYPE_CHECKING:
    from onnxlr.passes import Scheme

DEFAULT_RANK_RATIO = 0.25


@dataclasses.dataclass(frozen=True)
class RankPolicy:
    """One rank policy and its value; subclasses declare what the CLI shows and how the value is checked."""

    value: float

    keyword: ClassVar[str]  # the Python keyword; the CLI flag is "--" + it with dashes
    metavar: ClassVar[str] = "P"
    help: ClassVar[str]
    kind: ClassVar[str] = "fraction"  # how the value is checked and parsed: "fraction" (0, 1], "count" >= 1, "positive"

    def __post_init__(self) -> None:
        check_value(self.keyword, self.value, self.kind)

    @property
    def fraction_bound(self) -> float | None:
        """A per-layer bound on the kept parameters (param_ratio's), which rounding up must respect."""
        return None


class LayerPolicy(RankPolicy):
    """Each layer's rank on its own, from one view of its weight."""

    needs_spectrum: ClassVar[bool] = False  # the rank reads the singular values (an SVD before the rank is known)

    def rank(self, scheme: Scheme, spectrum: Callable[[], lowrank.Decomposition]) -> int:
        raise NotImplementedError


class Budget(RankPolicy):
    """The factorizable layers together keep at most `value` of a measure (onnxlr.factorize.plan.allocate_budget)."""

    measure: ClassVar[str]  # "params", "macs" or "latency"


class Goal(RankPolicy):
    """An end-to-end target on held-out outputs; met by the smallest parameter budget that reaches it."""

    metric: ClassVar[str]  # "cosine", "error", or a task metric: "top1", "neighbours"


@dataclasses.dataclass(frozen=True)
class RankRatio(LayerPolicy):
    keyword = "rank_ratio"
    metavar = "R"
    help = "Rank = ceil(R x full rank), 0 < R <= 1. The default policy (0.25) when none is given."

    def rank(self, scheme: Scheme, spectrum: Callable[[], lowrank.Decomposition]) -> int:
        return lowrank.rank_for_ratio(self.value, scheme.full_rank)


@dataclasses.dataclass(frozen=True)
class Rank(LayerPolicy):
    value: int  # a count, not a fraction
    keyword = "rank"
    metavar = "N"
    kind = "count"
    help = "The same rank N everywhere."

    def rank(self, scheme: Scheme, spectrum: Callable[[], lowrank.Decomposition]) -> int:
        return min(self.value, scheme.full_rank)


@dataclasses.dataclass(frozen=True)
class Energy(LayerPolicy):
    keyword = "energy"
    metavar = "E"
    needs_spectrum = True
    help = "Smallest rank keeping fraction E of the squared singular values."

    def rank(self, scheme: Scheme, spectrum: Callable[[], lowrank.Decomposition]) -> int:
        return lowrank.rank_for_energy(spectrum(), self.value)


@dataclasses.dataclass(frozen=True)
class ParamRatio(LayerPolicy):
    keyword = "param_ratio"
    help = "Per layer: largest rank whose factor pair has <= P x the original parameters."

    def rank(self, scheme: Scheme, spectrum: Callable[[], lowrank.Decomposition]) -> int:
        return lowrank.rank_for_param_ratio(self.value, scheme.params_before, scheme.params_per_rank, scheme.full_rank)

    @property
    def fraction_bound(self) -> float | None:
        return self.value


@dataclasses.dataclass(frozen=True)
class ParamBudget(Budget):
    keyword = "param_budget"
    measure = "params"
    help = ("Whole model: ranks chosen so the factorizable layers keep <= P of their parameters (some may stay "
            "dense).")


@dataclasses.dataclass(frozen=True)
class MacBudget(Budget):
    keyword = "mac_budget"
    measure = "macs"
    help = "Whole model: ranks chosen so the factorizable layers keep <= P of their MACs (some may stay dense)."


@dataclasses.dataclass(frozen=True)
class TargetCosine(Goal):
    keyword = "target_cosine"
    metavar = "C"
    metric = "cosine"
    help = ("Rank policy, with --calibration and held-out --inputs: the smallest parameter budget whose outputs keep "
            "cosine >= C on the held-out inputs (bisection, allocation by sensitivity).")


@dataclasses.dataclass(frozen=True)
class TargetError(Goal):
    keyword = "target_error"
    metavar = "E"
    metric = "error"
    kind = "positive"
    help = ("Rank policy, like --target-cosine: the smallest parameter budget whose outputs stay within relative "
            "error ||Y'-Y||/||Y|| <= E on the held-out inputs.")


@dataclasses.dataclass(frozen=True)
class TargetTop1(Goal):
    keyword = "target_top1"
    metavar = "A"
    metric = "top1"
    help = ("Rank policy, like --target-cosine on a task metric: the smallest parameter budget whose score outputs "
            "keep the predicted class (argmax; a language model's next token) of >= A of the held-out samples.")


@dataclasses.dataclass(frozen=True)
class TargetNeighbours(Goal):
    keyword = "target_neighbours"
    metavar = "N"
    metric = "neighbours"
    help = ("Rank policy, like --target-cosine on a task metric: the smallest parameter budget whose embedding "
            "outputs keep neighbour agreement >= N among the held-out samples (each one's 5 nearest; per-token "
            "outputs pooled over the attention mask).")


@dataclasses.dataclass(frozen=True)
class LatencyBudget(Budget):
    keyword = "latency_budget"
    measure = "latency"
    help = ("Rank policy (implies --objective latency): keep <= fraction P of the factorizable layers' measured time, "
            "allocated greedily on energy per millisecond.")


@dataclasses.dataclass(frozen=True)
class SizeBudget(RankPolicy):
    keyword = "size_budget"
    help = ("With --quantize auto: the written model's weights take <= P of the input's bytes, with the least "
            "predicted output error (each layer's precision and correction rank planned together).")


# Every policy, in the order the settings record them and the CLI lists them.
POLICIES: tuple[type[RankPolicy], ...] = (RankRatio, Rank, Energy, ParamRatio, ParamBudget, MacBudget, TargetCosine,
                                          TargetError, TargetTop1, TargetNeighbours, LatencyBudget, SizeBudget)
BY_KEYWORD = {policy.keyword: policy for policy in POLICIES}
BUDGETS = {policy.measure: policy for policy in POLICIES if issubclass(policy, Budget)}


def from_keywords(keywords: dict[str, Any]) -> RankPolicy | None:
    """Pop the policy keywords from `keywords` (None values are not given); the one given, else None."""
    given = [(name, keywords.pop(name)) for name in list(keywords) if name in BY_KEYWORD]
    given = [(name, value) for name, value in given if value is not None]
    if len(given) > 1:
        raise OnnxlrError(f"choose one rank policy, not {len(given)}: "
                          + ", ".join(f"{{{i}}}" for i in range(len(given))), *(name for name, _ in given))
    return BY_KEYWORD[given[0][0]](given[0][1]) if given else None


def as_keywords(policy: RankPolicy) -> dict[str, Any]:
    """Every policy keyword, the chosen one with its value and the others None (what settings record)."""
    return {cls.keyword: (policy.value if type(policy) is cls else None) for cls in POLICIES}


def check_value(name: str, value: Any, kind: str) -> None:
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OnnxlrError(f"{{0}} must be a positive integer, got {value!r}", name)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        expected = "a number in (0, 1]" if kind == "fraction" else "a positive number"
        raise OnnxlrError(f"{{0}} must be {expected}, got {value!r}", name)
    if kind == "fraction" and not (0 < value <= 1):
        raise OnnxlrError(f"{{0}} must be in (0, 1], got {value}", name)
    if kind == "positive" and value <= 0:
        raise OnnxlrError(f"{{0}} must be a positive number, got {value!r}", name)
