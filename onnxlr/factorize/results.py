"""Typed results of the optimize pipeline: a row per layer and the report, each built in one place.

`Report.to_json()` is the single source of truth: the JSON file, the terminal tables, Markdown and
HTML all render from it. Each row carries the skip reason's stable code (`reason_code`) beside
its sentence (`reason`), so scripts match codes, not English.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from onnxlr._version import __version__
from onnxlr.factorize.groups import WeightGroup, repeated_params
from onnxlr.factorize.targets import SkippedNode

if TYPE_CHECKING:
    from onnxlr.factorize.decisions import Decision, Plan
    from onnxlr.factorize.svd import SvdCache
    from onnxlr.timing.measured import LayerTiming, Measured


@dataclasses.dataclass
class LayerRow:
    """One MatMul/Gemm/Conv node (or a node left alone) in the report, in graph order."""

    name: str
    op_type: str
    status: str  # "factorized" or "skipped"
    reason: str
    reason_code: str
    weight: str | None = None
    weight_shape: list[int] | None = None
    dtype: str | None = None
    scheme: str | None = None
    rank: int | None = None
    full_rank: int | None = None
    break_even_rank: int | None = None
    retained_energy: float | None = None
    method: str | None = None
    svd: str | None = None
    svd_tail_excess: float | None = None
    sensitivity: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    shared_with: list[str] = dataclasses.field(default_factory=list)

    carried_by: str | None = None  # the row that counts the shared weight's parameters (None: this one)
    partner: str | None = None  # method "joint": the other layer of the coupled pair
    pair_kind: str | None = None  # method "joint": mlp, gated, conv, attention-vo or attention-qk
    # --objective latency: the node's measured time and its pair's at the planned rank (ms, in isolation)
    original_ms: float | None = None
    pair_ms: float | None = None

    @classmethod
    def of_joint(cls, group: WeightGroup, decision: Decision, sensitivity: float | None = None) -> LayerRow:
        """A layer compressed with its coupled partner (onnxlr.coupled.plans): rank = the kept inner neurons (an
        attention pair's: the dimensions each head keeps, full_rank its head size).

        Its parameters are the weight's and the bias's (an up layer's bias shrinks with the neurons, and an
        up conv's row also counts the BatchNormalization after it)."""
        role, target = decision.joint, group.lead
        plan = role.plan
        kept, width = len(plan.fit.kept), plan.pair.width
        before, after = role.params()
        macs_before = group.reader_scheme(0, decision.scheme).macs_before
        return cls(
            name=target.name, op_type=target.node.op_type, status="factorized", reason="", reason_code="",
            weight=target.weight.name, weight_shape=list(target.array.shape), dtype=target.dtype.name,
            scheme="joint", rank=kept, full_rank=width, method="joint",
            retained_energy=1.0 - plan.joint_error if plan.joint_error is not None else None,
            sensitivity=sensitivity, params_before=before, params_after=after, macs_before=macs_before,
            macs_after=macs_before * kept // width, partner=role.partner,
            pair_kind=plan.pair.kind,
        )

    @classmethod
    def of_target(cls, group: WeightGroup, decision: Decision, svd: SvdCache, index: int, carrier: int,
                  repeated_fixed: int, timing: LayerTiming | None = None, sensitivity: float | None = None
                  ) -> LayerRow:
        """Reader `index` of a group. The weight's parameters count in the carrier's row only, and a bias
        in the first row that reads it (`repeated_fixed`: this reader's bias parameters counted before)."""
        target = group.targets[index]
        factorized = decision.factorized
        # A skipped group reports the costs of its first view, which are those of the original node.
        planned = decision.scheme or group.schemes[0]
        own = group.reader_scheme(index, decision.scheme)
        decomposition = svd.decompositions(group).get(planned.name)
        rank = decision.rank if factorized else None
        fitted = decomposition if rank else None  # the SVD behind the row's rank, when it has one
        weight_before = planned.params_before - planned.fixed_params
        weight_after = rank * planned.params_per_rank if rank else weight_before
        fixed = own.fixed_params - repeated_fixed
        carries = index == carrier
        macs_before = own.macs_before
        return cls(
            name=target.name,
            op_type=target.node.op_type,
            status="factorized" if factorized else "skipped",
            reason=decision.reason,
            reason_code=decision.reason_code,
            weight=target.weight.name,
            weight_shape=list(target.array.shape),
            dtype=target.dtype.name,
            scheme=own.name if factorized else None,
            rank=rank,
            full_rank=planned.full_rank,
            break_even_rank=planned.break_even_rank,
            retained_energy=fitted.retained_energy(rank) if fitted and rank else None,
            method=fitted.method if fitted else None,
            svd=fitted.solver if fitted else None,
            svd_tail_excess=fitted.tail_excess if fitted else None,
            sensitivity=sensitivity,
            params_before=(weight_before if carries else 0) + fixed,
            params_after=(weight_after if carries else 0) + fixed,
            macs_before=macs_before,
            macs_after=own.macs_after(rank) if rank else macs_before,
            shared_with=[t.name for t in group.targets if t is not target],
            carried_by=None if carries else group.targets[carrier].name,
            original_ms=timing.original_ms if timing is not None and carries else None,
            pair_ms=(timing.ms(decision.scheme, rank) if timing is not None and decision.scheme and carries and rank
                     else None),
        )

    @classmethod
    def of_skipped(cls, item: SkippedNode) -> LayerRow:
        return cls(name=item.node.name or "?", op_type=item.node.op_type, status="skipped", reason=item.reason,
                   reason_code=item.code)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """What an optimize run did: settings, totals, layers, costs; the CLI adds input, output, verification."""

    settings: dict[str, Any]
    totals: dict[str, Any]
    layers: list[LayerRow]
    cost: dict[str, Any]
    calibration: dict[str, Any] | None = None
    input: str | None = None
    output: str | None = None
    verification: Any = None  # onnxlr.verification.verify.VerificationResult
    targets: dict[str, Any] | None = None  # edge estimates (onnxlr.timing.edge.before_after)
    quantization: dict[str, Any] | None = None  # --quantize: the mode and the bytes of each stage
    latency: dict[str, Any] | None = None  # --objective latency: the measured plan (onnxlr.timing.latency.plan_summary)
    speed: dict[str, Any] | None = None  # the size objective's end-to-end speed check (onnxlr.timing.confirm.Speed)
    data: list[dict[str, Any]] | None = None  # text data tokenized for the run (onnxlr.model_io.text.Tokenized)
    folder: dict[str, Any] | None = None  # an exported model folder in and out (onnxlr.model_io.folders)
    onnxlr_version: str = __version__

    def mark_reverted(self, reverted: dict[str, str], after: dict[str, int]) -> None:
        """Rows of the layers the end-to-end confirmation put back (onnxlr.timing.confirm): skipped, `not_faster_in_model`;
        totals from `after` (the model's params and bytes as written)."""
        for row in self.layers:
            if row.status == "factorized" and row.name in reverted:
                row.status, row.reason_code, row.reason = "skipped", "not_faster_in_model", reverted[row.name]
                row.scheme = row.rank = row.method = row.svd = row.pair_ms = row.partner = row.pair_kind = None
                row.retained_energy = row.svd_tail_excess = None
                row.params_after, row.macs_after = row.params_before, row.macs_before
        self.totals.update(params_after=after["params"], bytes_after=after["bytes"],
                           macs_after=sum(row.macs_after or 0 for row in self.layers),
                           factorized=sum(row.status == "factorized" for row in self.layers),
                           skipped=sum(row.status == "skipped" for row in self.layers))

    @property
    def modified(self) -> bool:
        return any(layer.status == "factorized" for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"onnxlr_version": self.onnxlr_version, "settings": self.settings,
                                "totals": self.totals, "layers": [layer.to_json() for layer in self.layers],
                                "cost": self.cost}
        optional = {"calibration": self.calibration, "input": self.input, "output": self.output,
                    "targets": self.targets, "quantization": self.quantization, "latency": self.latency,
                    "speed": self.speed, "data": self.data, "folder": self.folder,
                    "verification": self.verification.to_json() if self.verification is not None else None}
        data.update({key: value for key, value in optional.items() if value is not None})
        return data


def build_report(plan: Plan, groups: list[WeightGroup], skipped: list[SkippedNode], settings: dict[str, Any],
                 order: dict[int, int], before: dict[str, int], after: dict[str, int] | None,
                 cost: dict[str, Any], calibration: dict[str, Any] | None, measured: Measured | None = None,
                 sensitivities: Mapping[int, float] | None = None) -> Report:
    """The report of a run: rows in graph order, totals before and after (estimated for a dry run); `measured`:
    --objective latency's times (each row's original_ms and pair_ms), `sensitivities` (by group) each row's."""
    readers = sorted(((order.get(id(t.node), 0), g, i) for g in groups for i, t in enumerate(g.targets)),
                     key=lambda item: item[0])
    carriers: dict[int, int] = {}  # group -> the reader first in graph order: its row counts the weight
    counted: set[int] = set()  # biases already counted, by stored tensor
    rows = []
    for position, group, index in readers:
        carrier = carriers.setdefault(id(group), index)
        repeated = repeated_params(group.biases[index], counted) if group.biases else 0
        timing = measured.timing(group) if measured is not None else None
        sensitivity = (sensitivities or {}).get(id(group))
        decision = plan[group]
        row = (LayerRow.of_joint(group, decision, sensitivity) if decision.joint is not None
               else LayerRow.of_target(group, decision, plan.svd, index, carrier, repeated, timing, sensitivity))
        rows.append((position, row))
    rows += [(order.get(id(item.node), 0), LayerRow.of_skipped(item)) for item in skipped]
    layers = [row for _, row in sorted(rows, key=lambda pair: pair[0])]
    if after is None:  # dry run: estimate what the rewrite would give
        after = {"params": before["params"], "bytes": before["bytes"]}
        for group in groups:
            decision = plan[group]
            if decision.factorized:
                assert decision.scheme is not None and decision.rank is not None  # planned
                delta = decision.scheme.params_before - decision.scheme.params_after(decision.rank)
            elif decision.joint is not None:
                row = LayerRow.of_joint(group, decision)
                assert row.params_before is not None and row.params_after is not None  # a joint row counts both
                delta = row.params_before - row.params_after
            else:
                continue
            after["params"] -= delta
            after["bytes"] -= delta * group.lead.array.itemsize
    totals = {
        "params_before": before["params"],
        "params_after": after["params"],
        "bytes_before": before["bytes"],
        "bytes_after": after["bytes"],
        "macs_before": sum(row.macs_before or 0 for row in layers),
        "macs_after": sum(row.macs_after or 0 for row in layers),
        "factorized": sum(row.status == "factorized" for row in layers),
        "skipped": sum(row.status == "skipped" for row in layers),
    }
    return Report(settings=settings, totals=totals, layers=layers, cost=cost, calibration=calibration)
