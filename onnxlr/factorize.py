"""The optimize pipeline on an in-memory onnx-ir model: find targets, plan ranks, rewrite, clean up.

Each stage takes and returns plain data (targets, a plan, a report dict), so the CLI and the
Python API share one path. `factorize_model` modifies the given `ir.Model` in place; callers that
must keep their input (the API and the CLI) hand it a fresh copy (onnxlr.io.load makes one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import heapq
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxlr import datafit, lowrank, parallel
from onnxlr._version import __version__
from onnxlr.calibration import CONV_WHITENED_SCHEME, INPUT_SIDE
from onnxlr.errors import OnnxlrError
from onnxlr.passes import LEFT_ALONE, PASSES, Context, Scheme, Skip, Target
from onnxlr.passes.base import FLOAT_TYPES, NameGenerator
from onnxlr.passes.conv import SCHEMES as CONV_SCHEMES

logger = logging.getLogger(__name__)

DEFAULT_RANK_RATIO = 0.25
ALL_OPS = tuple(PASSES)

# A progress hook wraps an iterable: progress(items, description) -> items (rich bar in the CLI).
Progress = Callable[[Sequence[Any], str], Iterable[Any]]


MAX_DEFAULT_JOBS = 8


def default_jobs() -> int:
    """One SVD thread per core this process may use (SVDs run on one BLAS thread each, for identical output)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_JOBS))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of `onnxlr optimize`; the same names as the CLI flags."""

    rank_ratio: float | None = None
    rank: int | None = None
    energy: float | None = None
    param_ratio: float | None = None
    param_budget: float | None = None
    mac_budget: float | None = None
    target_cosine: float | None = None
    target_error: float | None = None
    rank_multiple: int = 1
    allow_no_gain: bool = False
    min_params: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ops: tuple[str, ...] = ALL_OPS
    conv_scheme: str = "auto"
    compensate: bool = False
    svd: str = "auto"
    device: str = "cpu"
    jobs: int | None = None  # None: one per available core (up to MAX_DEFAULT_JOBS); never changes the output

    def __post_init__(self) -> None:
        if self.jobs is None:
            object.__setattr__(self, "jobs", default_jobs())
        policies = self.policies()
        if len(policies) > 1:
            raise OnnxlrError(f"choose one rank policy, not {len(policies)}: {', '.join(policies)}")
        if not policies:
            object.__setattr__(self, "rank_ratio", DEFAULT_RANK_RATIO)
        _check_fraction("rank_ratio", self.rank_ratio, closed_low=False)
        _check_fraction("energy", self.energy, closed_low=False)
        _check_fraction("param_ratio", self.param_ratio, closed_low=False)
        _check_fraction("param_budget", self.param_budget, closed_low=False)
        _check_fraction("mac_budget", self.mac_budget, closed_low=False)
        _check_fraction("target_cosine", self.target_cosine, closed_low=False)
        if self.target_error is not None and (isinstance(self.target_error, bool)
                                              or not isinstance(self.target_error, (int, float))
                                              or not math.isfinite(self.target_error) or self.target_error <= 0):
            raise OnnxlrError(f"target_error must be a positive number, got {self.target_error!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise OnnxlrError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise OnnxlrError(f"rank_multiple must be a positive integer, got {self.rank_multiple!r}")
        if not isinstance(self.min_params, int) or self.min_params < 0:
            raise OnnxlrError(f"min_params must be a non-negative integer, got {self.min_params!r}")
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        unknown = [op for op in self.ops if op not in PASSES]
        if unknown:
            raise OnnxlrError(f"unsupported op type(s) {', '.join(unknown)}; choose from {', '.join(PASSES)}")
        if self.conv_scheme not in ("auto", *CONV_SCHEMES):
            raise OnnxlrError(f"conv_scheme must be auto, {', '.join(CONV_SCHEMES)}; got {self.conv_scheme!r}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise OnnxlrError(f"jobs must be a positive integer, got {self.jobs!r}")
        lowrank.check_device(self.solver.device)  # validates svd and device first

    @property
    def solver(self) -> lowrank.Solver:
        return lowrank.Solver(svd=self.svd, device=self.device)

    def policies(self) -> list[str]:
        names = ("rank_ratio", "rank", "energy", "param_ratio", "param_budget", "mac_budget", "target_cosine",
                 "target_error")
        return [name for name in names if getattr(self, name) is not None]

    @property
    def budget(self) -> tuple[str, float] | None:
        """The whole-model budget, ("params" or "macs", fraction kept), when one is the policy."""
        if self.param_budget is not None:
            return "params", self.param_budget
        if self.mac_budget is not None:
            return "macs", self.mac_budget
        return None

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _check_fraction(name: str, value: float | None, closed_low: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OnnxlrError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (0 < value <= 1):
        raise OnnxlrError(f"{name} must be in (0, 1], got {value}")


# ----------------------------------------------------------------------------- plan data


@dataclasses.dataclass
class WeightGroup:
    """Targets that read one weight the same way: factorized once, every user rewritten alike."""

    targets: list[Target]
    schemes: list[Scheme] = dataclasses.field(default_factory=list)
    decompositions: dict[str, lowrank.Decomposition] = dataclasses.field(default_factory=dict)
    scheme: Scheme | None = None
    rank: int | None = None
    reason: str = ""  # set when the group stays dense
    gram: np.ndarray | None = None  # activation second moment (calibration): whitened SVD when set
    cross: np.ndarray | None = None  # error compensation: sum x_c x_o^T (gram is then that of x_c)
    sensitivity: float | None = None  # end-to-end output error per unit of lost (whitened) energy
    slot: int | None = None  # this weight's feed in the calibration runner (datafit)
    solver: lowrank.Solver = dataclasses.field(default_factory=lowrank.Solver)  # --svd / --device

    @property
    def lead(self) -> Target:
        return self.targets[0]

    def whitens(self, scheme: Scheme) -> bool:
        """Calibration statistics apply to this view (for Conv, only the view that multiplies patches)."""
        return self.gram is not None and (self.lead.role != "kernel" or scheme.name == CONV_WHITENED_SCHEME)

    def decomposition(self, scheme: Scheme, rank: int | None = None) -> lowrank.Decomposition:
        """The SVD of a view; with `rank`, only the leading `rank` triplets are needed (randomized may do)."""
        cached = self.decompositions.get(scheme.name)
        if cached is not None and (not cached.partial or (rank is not None and rank <= cached.full_rank)):
            return cached
        if self.whitens(scheme):
            side = INPUT_SIDE[self.lead.role]
            result = lowrank.whitened_svd(scheme.matrices, self.gram, side=side, cross=self.cross)
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
        dense = self.lead.handler.dense_weight(self.lead, scheme, np.matmul(a, b))
        return np.ascontiguousarray(dense.astype(self.lead.array.dtype))


@dataclasses.dataclass
class SkippedNode:
    node: ir.Node
    reason: str


# ----------------------------------------------------------------------------- pipeline


def factorize_model(model: ir.Model, settings: Settings, progress: Progress | None = None,
                    dry_run: bool = False, input_shapes: Mapping[str, Sequence[int]] | None = None,
                    statistics: Mapping[str, np.ndarray] | None = None, node_costs: dict[str, list] | None = None,
                    calibration_data: datafit.CalibrationData | None = None, sink: Any = None) -> dict[str, Any]:
    """Factorize `model` in place (unless `dry_run`) and return the report dict.

    `sink` (onnxlr.io.DataFile): the output's external-data file; each layer's factors are written
    there as soon as they exist, so they never accumulate in memory.

    `calibration_data`: the original model's source and calibration batches (onnxlr.datafit); the
    targets then get the activation-whitened SVD, `--param-budget` allocates by measured
    sensitivity, and `compensate` / `target_cosine` become available. `statistics` (Gram matrices
    by target output name, onnxlr.calibration.collect_grams) gives the whitened SVD alone.
    """
    from onnxlr import cost

    progress = progress or (lambda items, _description: items)
    totals_before = model_totals(model)
    context = Context(shapes=infer_shapes(model, input_shapes), opset=_default_opset(model))
    nodes_before = cost.model_costs(model, context.shapes)
    cost_before = cost.totals(nodes_before, model)
    # Graph order (subgraph nodes follow their parent), taken before the rewrite removes nodes.
    order = {id(node): index for index, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph))}
    groups, skipped = find_targets(model, settings, context)
    runner = None
    if calibration_data is not None:
        runner = datafit.prepare(model, groups, calibration_data, progress)
    elif statistics:
        attach_statistics(groups, statistics)
    _check_data_needs(settings, runner, calibration_data)
    # Per-layer policies plan each layer on its own, inside the streaming loop; whole-model budgets
    # and calibration runs plan every layer first.
    per_layer = runner is None and settings.budget is None
    calibration_report = None
    with lowrank.one_blas_thread():  # the same factors whatever --jobs and the core count
        if per_layer:
            prepare_schemes(groups)
        else:
            calibration_report = plan_with_data(model, groups, settings, progress, runner, calibration_data)
        factorize_groups(model, groups, settings, progress, plan=per_layer, dry_run=dry_run, sink=sink)
    if not dry_run:
        cleanup(model, groups)
        record_metadata(model, settings, groups)
    report = build_report(groups, skipped, settings, order, totals_before, model_totals(model) if not dry_run else None)
    if calibration_report is not None:
        report["calibration"] = calibration_report
    report["cost"] = {"before": cost_before}
    if not dry_run:
        nodes_after = cost.model_costs(model, infer_shapes(model, input_shapes))
        report["cost"]["after"] = cost.totals(nodes_after, model)
    if node_costs is not None:  # per-node figures for callers that need more than totals (edge estimates)
        node_costs["before"] = nodes_before
        if not dry_run:
            node_costs["after"] = nodes_after
    return report


def _check_data_needs(settings: Settings, runner: Any, data: datafit.CalibrationData | None) -> None:
    for flag, wanted in (("--target-cosine", settings.target_cosine is not None),
                         ("--target-error", settings.target_error is not None), ("--compensate", settings.compensate)):
        if wanted and data is None:
            raise OnnxlrError(f"{flag} needs calibration data (--calibration FILE.npz)")
        if wanted and runner is None:
            raise OnnxlrError(f"{flag}: no factorizable layer of the main graph can be calibrated")


def plan_with_data(model: ir.Model, groups: list[WeightGroup], settings: Settings, progress: Progress,
                   runner: Any, data: datafit.CalibrationData | None) -> dict[str, Any] | None:
    """Plan ranks; with calibration, also measure sensitivity, search the budget and compensate."""
    prepare_schemes(groups)
    if runner is None:
        plan_ranks(groups, settings, progress)
        return None
    assert data is not None
    result: dict[str, Any] = {"samples": data.samples, "compensate": settings.compensate}
    goal = datafit.Goal.of(settings)
    if settings.budget is not None or goal is not None:
        datafit.measure_sensitivity(groups, runner, data, lambda g: _budget_scheme(g, settings), progress)
    if goal is not None:
        initial = {id(g): g.reason for g in groups}
        quiet = lambda items, _description: items  # noqa: E731 (each trial re-plans: no bars)

        def plan(budget: float | None) -> None:
            for group in groups:
                group.reason, group.rank, group.scheme = initial[id(group)], None, None
            if budget is None:
                for group in groups:
                    group.reason = group.reason or f"kept dense: no budget reaches {goal}"
                return
            plan_ranks(groups, dataclasses.replace(settings, target_cosine=None, target_error=None,
                                                   param_budget=budget), quiet)

        result["search"] = datafit.search_budget(groups, goal, runner, data, plan, progress)
    else:
        plan_ranks(groups, settings, progress)
    if settings.compensate:
        result["refitted"] = datafit.compensate(model, groups, runner, data, progress)
    return result


def _default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def infer_shapes(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None
                 ) -> dict[str, tuple | None]:
    """Static shapes by value name from ONNX shape inference (unknown dims as None), all graphs included.

    `input_shapes` fixes graph inputs' dimensions first (`--shape input_ids:1x128`). Inference runs
    on a serialized copy in which every initializer is a data-less external reference, so no
    weight is copied; a model onnx cannot infer (custom ops, say) just yields fewer shapes.
    """
    shapes: dict[str, tuple | None] = {}
    try:
        with _initializers_as_references(model):
            proto = ir.serde.serialize_model(model)
        for graph_input in proto.graph.input:
            if input_shapes and graph_input.name in input_shapes:
                _set_dims(graph_input, input_shapes[graph_input.name])
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except OnnxlrError:
        raise
    except Exception as exc:  # inference is best effort: MACs become per unit of unknown dims
        logger.info("shape inference failed: %s", exc)
        return shapes
    _collect_shapes(inferred.graph, shapes)
    return shapes


def _set_dims(value_info: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = value_info.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise OnnxlrError(f"--shape {value_info.name}: {len(dims)} dimensions given, the input has {len(shape.dim)}")
    for dim, size in zip(shape.dim, dims):
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise OnnxlrError(f"--shape {value_info.name}: dimension {dim.dim_value} is fixed, cannot be {size}")
        dim.Clear()
        dim.dim_value = int(size)


@contextlib.contextmanager
def _initializers_as_references(model: ir.Model) -> Iterator[None]:
    """Swap initializer tensors for external references that are never read (shape inference needs shapes only)."""
    swapped: list[tuple[ir.Value, Any]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                # Integer tensors (shapes, position ids) and tiny ones stay: they feed data propagation.
                if (tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes <= 4096
                        or not tensor.dtype.is_floating_point()):
                    continue
                swapped.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    "__shapes_only__", offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape,
                    name=tensor.name, base_dir="")
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _collect_shapes(graph: onnx.GraphProto, shapes: dict[str, tuple | None]) -> None:
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    for init in graph.initializer:
        shapes.setdefault(init.name, tuple(init.dims))
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _collect_shapes(sub, shapes)


def find_targets(model: ir.Model, settings: Settings, context: Context
                 ) -> tuple[list[WeightGroup], list[SkippedNode]]:
    """Ask each node's pass whether it is a target; group targets by the weight they read."""
    handlers = {op: PASSES[op]() for op in settings.ops}
    targets: list[Target] = []
    skipped: list[SkippedNode] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in LEFT_ALONE:
            skipped.append(SkippedNode(node, LEFT_ALONE[node.op_type]))
            continue
        if node.op_type not in handlers:
            continue
        reason = _filter_reason(node, settings)
        if reason:
            skipped.append(SkippedNode(node, reason))
            continue
        try:
            target = handlers[node.op_type].match(node, context)
            _check_weight(target)
        except Skip as skip:
            skipped.append(SkippedNode(node, str(skip)))
            continue
        targets.append(target)
    return _group_shared_weights(targets, skipped, settings)


def _filter_reason(node: ir.Node, settings: Settings) -> str:
    name = node.name or ""
    if settings.include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.include):
        return "not matched by --include"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.exclude):
        return "matched by --exclude"
    return ""


def _check_weight(target: Target) -> None:
    if target.dtype not in FLOAT_TYPES:
        raise Skip(f"weight dtype {target.dtype.name} is not a float type")
    if target.array.size == 0:
        raise Skip("weight is empty (a zero-sized dimension)")
    if not np.all(np.isfinite(target.array.astype(np.float32, copy=False))):
        raise Skip("weight has NaN or Inf values")


def _group_shared_weights(targets: list[Target], skipped: list[SkippedNode], settings: Settings
                          ) -> tuple[list[WeightGroup], list[SkippedNode]]:
    by_weight: dict[int, list[Target]] = {}
    for target in targets:
        by_weight.setdefault(id(target.weight), []).append(target)
    target_nodes = {id(t.node) for t in targets}
    groups: list[WeightGroup] = []
    for users in by_weight.values():
        weight = users[0].weight
        others = [n for n in weight.consumers() if id(n) not in target_nodes]
        views = {t.view_key for t in users}
        reason = ""
        if others:
            reason = f"weight is also read by {others[0].op_type} node {others[0].name!r}, which cannot be rewritten"
        elif len(views) > 1:
            reason = "weight is shared by nodes that read it differently"
        if reason:
            skipped.extend(SkippedNode(t.node, reason) for t in users)
            continue
        group = WeightGroup(targets=users, solver=settings.solver)
        if users[0].array.size < settings.min_params:
            group.reason = f"fewer than --min-params {settings.min_params} parameters"
        groups.append(group)
    return groups, skipped


def attach_statistics(groups: list[WeightGroup], statistics: Mapping[str, np.ndarray]) -> None:
    """Give each group the sum of its users' Grams (users without statistics add nothing)."""
    for group in groups:
        grams = [statistics[key] for key in (t.node.outputs[0].name for t in group.targets) if key in statistics]
        if grams:
            group.gram = np.sum(grams, axis=0)


# ----------------------------------------------------------------------------- rank planning


def prepare_schemes(groups: list[WeightGroup]) -> None:
    """Each group's matrix views and costs (no SVD yet), also for skipped groups: the report shows their MACs."""
    for group in groups:
        if not group.schemes:
            group.schemes = group.lead.handler.schemes(group.lead)


def plan_ranks(groups: list[WeightGroup], settings: Settings, progress: Progress) -> None:
    """Choose each group's scheme and rank (or leave it dense with a reason)."""
    prepare_schemes(groups)
    active = [g for g in groups if not g.reason]
    if settings.budget is not None:
        held = 0
        for group in progress(active, "SVD"):
            group.scheme = _budget_scheme(group, settings)
            decomposition = group.decomposition(group.scheme)
            held += _vector_bytes(decomposition)
            if group.gram is None and held > PLANNING_VECTOR_BYTES:
                # Allocation needs every spectrum, not the vectors: past the limit, free them so a large
                # model's planning holds one layer's SVD at a time (the rewrite computes it again, with
                # the same result). Calibrated groups keep theirs: sensitivity, compensation and the
                # target search feed their products many times.
                held -= _vector_bytes(decomposition)
                group.drop_vectors()
        allocate_budget(active, settings)
        for group in active:
            if group.rank is not None and not group.reason:
                _apply_break_even(group, settings)
    else:
        for group in progress(active, "SVD"):
            plan_layer(group, settings)


# Singular vectors that whole-model planning may keep for the rewrite; beyond, they are recomputed.
PLANNING_VECTOR_BYTES = 256 << 20


def _vector_bytes(decomposition: lowrank.Decomposition) -> int:
    return sum(v.nbytes for v in (decomposition.u, decomposition.vt) if v is not None)


def plan_layer(group: WeightGroup, settings: Settings) -> None:
    """A per-layer policy's scheme and final rank for one group (an SVD only where the policy needs a spectrum)."""
    _plan_group(group, settings)
    if group.rank is not None and not group.reason:
        _apply_break_even(group, settings)


def _budget_scheme(group: WeightGroup, settings: Settings) -> Scheme:
    by_name = {s.name: s for s in group.schemes}
    if settings.conv_scheme != "auto" and settings.conv_scheme in by_name:
        return by_name[settings.conv_scheme]
    if group.gram is not None and CONV_WHITENED_SCHEME in by_name:
        return by_name[CONV_WHITENED_SCHEME]
    return group.schemes[0]


def _policy_rank(group: WeightGroup, scheme: Scheme, settings: Settings) -> int:
    full = scheme.full_rank
    if settings.rank_ratio is not None:
        return lowrank.rank_for_ratio(settings.rank_ratio, full)
    if settings.rank is not None:
        return min(settings.rank, full)
    if settings.energy is not None:
        return lowrank.rank_for_energy(group.decomposition(scheme), settings.energy)
    assert settings.param_ratio is not None
    return lowrank.rank_for_param_ratio(settings.param_ratio, scheme.params_before, scheme.params_per_rank, full)


def _plan_group(group: WeightGroup, settings: Settings) -> None:
    """Rank by the policy on the reference scheme; conv picks the scheme with the fewest MACs at equal error."""
    by_name = {s.name: s for s in group.schemes}
    if settings.conv_scheme != "auto" and settings.conv_scheme in by_name:
        candidates = [by_name[settings.conv_scheme]]
    elif group.gram is not None and CONV_WHITENED_SCHEME in by_name:
        # Whitened and plain energies are not comparable: a calibrated conv keeps the whitened view.
        candidates = [by_name[CONV_WHITENED_SCHEME]]
    else:
        candidates = group.schemes
    reference = candidates[0]
    rank = _policy_rank(group, reference, settings)
    if len(candidates) == 1:
        group.scheme, group.rank = reference, rank
        return
    # "Same error": every scheme views the same kernel, so the Frobenius error of the kernel is
    # comparable; each other scheme gets the smallest rank that keeps at least the same energy.
    target_energy = group.decomposition(reference).retained_energy(rank)
    options = [(reference.macs_after(rank), 0, reference, rank)]
    for order, scheme in enumerate(candidates[1:], start=1):
        scheme_rank = lowrank.rank_for_energy(group.decomposition(scheme), target_energy)
        if settings.param_ratio is not None and scheme.params_after(scheme_rank) > settings.param_ratio * scheme.params_before:
            continue
        options.append((scheme.macs_after(scheme_rank), order, scheme, scheme_rank))
    _, _, group.scheme, group.rank = min(options, key=lambda o: (o[0], o[1]))


def _apply_break_even(group: WeightGroup, settings: Settings) -> None:
    scheme, rank = group.scheme, group.rank
    assert scheme is not None and rank is not None
    limit = min(scheme.break_even_rank, scheme.full_rank + 1)
    if settings.rank_multiple > 1:
        rank = lowrank.round_to_multiple(rank, settings.rank_multiple, limit if not settings.allow_no_gain
                                         else scheme.full_rank + 1)
    group.rank = rank
    if not settings.allow_no_gain and not scheme.gains(rank):
        group.reason = f"no gain: rank {rank} >= break-even {scheme.break_even_rank}"


def allocate_budget(groups: list[WeightGroup], settings: Settings) -> None:
    """Global ranks so the targets together keep <= the budget of their parameters (or MACs).

    Greedy on marginal value: start every layer at rank 1 (or the rank multiple), then repeatedly
    grant the step (more rank, or going back to dense past break-even) that recovers the most
    relative energy per parameter (or MAC), while it fits the budget; with measured sensitivities,
    energy is weighted by how much each layer's loss moves the model's outputs. Singular values
    decrease, so the marginal value of each layer's steps decreases too and greedy is close to optimal.
    """
    assert settings.budget is not None
    measure, fraction = settings.budget
    flag = "--param-budget" if measure == "params" else "--mac-budget"

    def before(scheme: Scheme) -> int:
        return scheme.params_before if measure == "params" else scheme.macs_before

    def after(scheme: Scheme, rank: int) -> int:
        return scheme.params_after(rank) if measure == "params" else scheme.macs_after(rank)

    total_before = sum(before(g.scheme) for g in groups)
    budget = fraction * total_before
    step = settings.rank_multiple
    spent = 0
    state: dict[int, int] = {}  # group index -> rank (0 means dense)
    for index, group in enumerate(groups):
        rank = min(step, group.scheme.full_rank)
        # A layer with no gaining rank at all (a 64x1 weight: rank 1 keeps 65 of 64) can only stay dense.
        state[index] = rank if group.scheme.gains(rank) else 0
        spent += after(group.scheme, rank) if state[index] else before(group.scheme)
    if spent > budget:
        raise OnnxlrError(
            f"{flag} {fraction} is too small: rank {step} in every layer that can be "
            f"factorized already keeps {spent / max(total_before, 1):.3f} of the {measure}"
        )
    heap: list[tuple[float, int, int, int]] = []  # (-value per param, index, new rank, cost)

    def push(index: int) -> None:
        group, rank = groups[index], state[index]
        scheme = group.scheme
        decomposition = group.decomposition(scheme)
        current_loss = 1.0 - decomposition.retained_energy(rank)
        new_rank = min(rank + step, scheme.full_rank)
        if new_rank == rank or not scheme.gains(new_rank):
            new_rank, gain, cost = 0, current_loss, before(scheme) - after(scheme, rank)
        else:
            gain = decomposition.retained_energy(new_rank) - decomposition.retained_energy(rank)
            cost = after(scheme, new_rank) - after(scheme, rank)
        if group.sensitivity is not None:  # measured: energy counts by how much it moves the outputs
            gain *= group.sensitivity
        if cost <= 0 or gain <= 0:
            return
        heapq.heappush(heap, (-gain / cost, index, new_rank, cost))

    for index in range(len(groups)):
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
        if state[index] == 0:
            group.reason = f"kept dense by the {flag} allocation"
        else:
            group.rank = state[index]


# ----------------------------------------------------------------------------- rewriting


def factorize_groups(model: ir.Model, groups: list[WeightGroup], settings: Settings, progress: Progress,
                     plan: bool, dry_run: bool = False, sink: Any = None) -> None:
    """SVD, factors and rewrite, one group at a time in graph order (up to --jobs SVDs at once).

    Each group's factors go into the model (written to `sink` right away when there is one) and its
    singular vectors are freed before later groups are taken, so memory holds a few layers' working
    sets, not the model's. `plan`: choose each group's scheme and rank here too (per-layer policies).
    Graph edits stay on this thread, in group order, so names and file layout do not depend on --jobs.
    """
    active = [g for g in groups if not g.reason]
    names = NameGenerator(model)

    def work(group: WeightGroup) -> tuple[np.ndarray, np.ndarray] | None:
        if plan:
            plan_layer(group, settings)
        if dry_run or group.reason or group.rank is None:
            return None
        a, b = group.factors(group.scheme, group.rank)
        first, second = group.lead.handler.factor_tensors(group.lead, group.scheme, a, b)
        dtype = group.lead.dtype.numpy()
        return np.ascontiguousarray(first.astype(dtype)), np.ascontiguousarray(second.astype(dtype))

    results = parallel.ordered_map(work, active, jobs=settings.jobs, cost=lambda g: _working_set(g, settings))
    with contextlib.closing(results):
        for group in progress(active, "SVD"):
            factors = next(results)
            if factors is not None:
                _rewrite_group(group, factors, names, sink)
            group.drop_vectors()


def _working_set(group: WeightGroup, settings: Settings) -> int:
    """Rough upper estimate of one group's SVD memory, for --jobs scheduling."""
    scheme = group.scheme or group.schemes[0]
    known_rank = group.rank
    if known_rank is None and settings.budget is None and settings.energy is None and len(group.schemes) == 1:
        known_rank = _policy_rank(group, scheme, settings)
    return lowrank.working_set_bytes(scheme.matrices.shape, known_rank, settings.svd) * len(group.schemes)


def _rewrite_group(group: WeightGroup, factors: tuple[np.ndarray, np.ndarray], names: NameGenerator,
                   sink: Any) -> None:
    lead = group.lead
    owner = _owning_graph(lead.weight, lead.node)
    base = lead.weight.name or lead.name
    first_value = _initializer(owner, names(f"{base}_lr_a"), factors[0], lead.dtype, sink)
    second_value = _initializer(owner, names(f"{base}_lr_b"), factors[1], lead.dtype, sink)
    for target in group.targets:
        node = target.node
        new_nodes = target.handler.rewrite(target, group.scheme, first_value, second_value, names)
        for position, new_node in enumerate(new_nodes, start=1):
            # Provenance, and which node ends the pair (verify --per-layer compares its output).
            new_node.metadata_props["onnxlr.source"] = node.name or ""
            new_node.metadata_props["onnxlr.pair"] = str(position)
        ir.convenience.replace_nodes_and_values(
            node.graph, node, [node], new_nodes, [node.outputs[0]], [new_nodes[-1].outputs[0]]
        )


def _owning_graph(weight: ir.Value, node: ir.Node) -> ir.Graph:
    """The graph that defines the weight: every user of it lives there or in a subgraph of it."""
    if weight.graph is not None:
        return weight.graph
    producer = weight.producer()
    if producer is not None and producer.graph is not None:
        return producer.graph
    return node.graph


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType, sink: Any = None) -> ir.Value:
    tensor: Any = ir.Tensor(np.ascontiguousarray(array.astype(dtype.numpy())), dtype=dtype, name=name)
    if sink is not None:  # straight to the output's data file; the model keeps a reference to it
        tensor = sink.append(tensor)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(dtype))
    graph.register_initializer(value)
    return value


def cleanup(model: ir.Model, groups: list[WeightGroup]) -> None:
    """Remove the nodes and initializers the rewrite left unused (replaced weights, folded chains)."""
    ir_passes.RemoveUnusedNodesPass()(model)
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
                del graph.initializers[name]


def record_metadata(model: ir.Model, settings: Settings, groups: list[WeightGroup]) -> None:
    ranks = {t.name: g.rank for g in groups if g.rank is not None and not g.reason for t in g.targets}
    model.metadata_props["onnxlr.version"] = __version__
    # --jobs changes how fast, not what: it stays out of the file so outputs are identical.
    recorded = {k: v for k, v in settings.as_dict().items() if k != "jobs"}
    model.metadata_props["onnxlr.settings"] = json.dumps(recorded, sort_keys=True)
    model.metadata_props["onnxlr.ranks"] = json.dumps(ranks, sort_keys=True)
    methods = sorted({g.decompositions[g.scheme.name].method for g in groups
                      if g.rank is not None and not g.reason and g.scheme.name in g.decompositions})
    model.metadata_props["onnxlr.methods"] = ",".join(methods)


# ----------------------------------------------------------------------------- report


def model_totals(model: ir.Model) -> dict[str, int]:
    """Parameters and bytes of every constant tensor in the model (shared tensors counted once)."""
    params = nbytes = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                params += value.const_value.size
                nbytes += value.const_value.nbytes
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                tensor = ir.convenience.get_const_tensor(node.outputs[0])
                if tensor is not None:
                    params += tensor.size
                    nbytes += tensor.nbytes
    return {"params": params, "bytes": nbytes}


def build_report(groups: list[WeightGroup], skipped: list[SkippedNode], settings: Settings,
                 order: dict[int, int], before: dict[str, int], after: dict[str, int] | None) -> dict[str, Any]:
    rows = [(order.get(id(t.node), 0), _layer_row(g, t)) for g in groups for t in g.targets]
    rows += [(order.get(id(item.node), 0), _skipped_row(item)) for item in skipped]
    layers = [row for _, row in sorted(rows, key=lambda pair: pair[0])]
    if after is None:  # dry run: estimate what the rewrite would give
        after = {"params": before["params"], "bytes": before["bytes"]}
        for group in groups:
            if group.rank is not None and not group.reason:
                delta = group.scheme.params_before - group.scheme.params_after(group.rank)
                after["params"] -= delta
                after["bytes"] -= delta * group.lead.array.itemsize
    totals = {
        "params_before": before["params"],
        "params_after": after["params"],
        "bytes_before": before["bytes"],
        "bytes_after": after["bytes"],
        "macs_before": sum(row["macs_before"] or 0 for row in layers),
        "macs_after": sum(row["macs_after"] or 0 for row in layers),
        "factorized": sum(row["status"] == "factorized" for row in layers),
        "skipped": sum(row["status"] == "skipped" for row in layers),
    }
    return {"onnxlr_version": __version__, "settings": settings.as_dict(), "totals": totals, "layers": layers}


def _layer_row(group: WeightGroup, target: Target) -> dict[str, Any]:
    factorized = group.rank is not None and not group.reason
    # A skipped group reports the costs of its first view, which are those of the original node.
    scheme = group.scheme or (group.schemes[0] if group.schemes else None)
    decomposition = group.decompositions.get(scheme.name) if scheme else None
    rank = group.rank if factorized else None
    return {
        "name": target.name,
        "op_type": target.node.op_type,
        "status": "factorized" if factorized else "skipped",
        "reason": group.reason,
        "weight": target.weight.name,
        "weight_shape": list(target.array.shape),
        "dtype": target.dtype.name,
        "scheme": scheme.name if factorized else None,
        "rank": rank,
        "full_rank": scheme.full_rank if scheme else None,
        "break_even_rank": scheme.break_even_rank if scheme else None,
        "retained_energy": decomposition.retained_energy(rank) if (decomposition and rank) else None,
        "method": decomposition.method if (decomposition and rank) else None,
        "svd": decomposition.solver if (decomposition and rank) else None,
        "svd_tail_excess": decomposition.tail_excess if (decomposition and rank) else None,
        "sensitivity": group.sensitivity,
        "params_before": scheme.params_before if scheme else int(target.array.size),
        "params_after": scheme.params_after(rank) if (scheme and rank) else (scheme.params_before if scheme else int(target.array.size)),
        "macs_before": scheme.macs_before if scheme else None,
        "macs_after": scheme.macs_after(rank) if (scheme and rank) else (scheme.macs_before if scheme else None),
        "shared_with": [t.name for t in group.targets if t is not target],
    }


def _skipped_row(item: SkippedNode) -> dict[str, Any]:
    return {
        "name": item.node.name or "?", "op_type": item.node.op_type,
        "status": "skipped", "reason": item.reason, "weight": None, "weight_shape": None, "dtype": None,
        "scheme": None, "rank": None, "full_rank": None, "break_even_rank": None, "retained_energy": None, "method": None,
        "svd": None, "svd_tail_excess": None,
        "sensitivity": None,
        "params_before": None, "params_after": None, "macs_before": None, "macs_after": None, "shared_with": [],
    }
