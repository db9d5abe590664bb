"""Latency-aware planning (`--objective latency`): every candidate factor pair is timed against its original node.

A candidate is (layer, scheme, rank). Each is built as an isolated micro-model (the original node alone, or the
factor pair its rule writes, with random factors of the candidate's shapes: the values do not change the time)
and timed with onnxruntime on the provider and thread count the user names, at the shapes the model really
sees, after warm-up, interleaved (original, candidates, then backwards, ...) and summarized by medians. A pair is
a candidate for the plan only when it measures at least MARGIN faster than its original node.

Times are cached per (op, attributes, input shapes and dtypes, scheme, rank) in one JSON file per (provider,
threads, onnxruntime version, CPU) in the user's cache folder, so a rerun or a budget sweep times nothing again.
`onnxlr bench MODEL --export-latency-table FILE` writes the same entries on a device onnxlr does not plan on, and
`--latency-table FILE` plans with them elsewhere (nothing is then timed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx_ir as ir

from onnxlr.errors import OnnxlrError
from onnxlr.passes import Context, NameGenerator, Scheme, Target
from onnxlr.passes.weights import constant_weight
from onnxlr.timing.measured import MARGIN, LayerTiming, Measured, measurably_faster

if TYPE_CHECKING:
    from onnxlr.factorize.decisions import Plan
    from onnxlr.factorize.groups import WeightGroup

VECTOR_WIDTH = 8  # fp32 lanes of an AVX2 register: ranks at its multiples are the rounding candidates
ROUNDINGS = (VECTOR_WIDTH, 2 * VECTOR_WIDTH, 4 * VECTOR_WIDTH)  # a per-layer rank may round up to these
LADDER_POINTS = 16  # ranks a budget may give one layer (at multiples of VECTOR_WIDTH)
SECONDS_PER_LAYER = 1.0  # timing budget of one layer's candidates together (rounds are clamped below)
MIN_ROUNDS, MAX_ROUNDS, WARMUP = 5, 200, 2
# A layer's cached times are timed again when the probe (a fixed MatMul timed with them) now runs this many times
# faster or slower: they were taken under another load (times taken while other processes held the cores were seen
# 8x too slow, and kept for every later run).
PROBE_TOLERANCE = 2.0
PROBE_SHAPE = (256, 256)
TABLE_FORMAT = "onnxlr-latency-table"
TABLE_VERSION = 1


class NotTimed(Exception):
    """A layer that cannot be timed (a non-float activation, say): it stays dense under --objective latency."""


class UnknownDims(NotTimed):
    """A layer whose input has dynamic dims at the shapes given: the run says which --shape to pass."""


# ----------------------------------------------------------------------------- which ranks are timed


def table_ranks(scheme: Scheme) -> list[int]:
    """Every rank an exported table holds for a view: 1..VECTOR_WIDTH-1 and the multiples of VECTOR_WIDTH, below
    break-even (the ranks a per-layer rounding or a budget's ladder can ask for)."""
    limit = scheme.break_even_rank - 1
    return [r for r in range(1, limit + 1) if r < VECTOR_WIDTH or r % VECTOR_WIDTH == 0]


def ladder_ranks(scheme: Scheme, rank_multiple: int = 1) -> list[int]:
    """The ranks a budget may give one layer: at most LADDER_POINTS, at multiples of VECTOR_WIDTH (and of
    --rank-multiple), below break-even; a layer too small for that takes every gaining rank up to LADDER_POINTS."""
    limit = scheme.break_even_rank - 1
    base = math.lcm(VECTOR_WIDTH, rank_multiple)
    if limit < base:
        return [r for r in range(rank_multiple, limit + 1, rank_multiple)][:LADDER_POINTS]
    step = base * math.ceil(limit / (base * LADDER_POINTS))
    return list(range(step, limit + 1, step))


def rounded_ranks(rank: int, scheme: Scheme) -> list[int]:
    """A per-layer policy's rank and its round-ups to vector multiples that still gain: the candidates timed."""
    candidates = [rank] + [-(-rank // m) * m for m in ROUNDINGS]
    return sorted({r for r in candidates if r < scheme.break_even_rank})


# ----------------------------------------------------------------------------- the clock


def cache_folder() -> Path:
    """$ONNXLR_CACHE_DIR, else $XDG_CACHE_HOME/onnxlr, else ~/.cache/onnxlr."""
    explicit = os.environ.get("ONNXLR_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxlr"


def device_context(provider: str, threads: int) -> dict[str, Any]:
    """What a measured time depends on besides the layer: the cache file's key, and an exported table's header."""
    import platform

    import onnxruntime as ort

    from onnxlr.timing.bench import cpu_model

    return {"provider": provider, "threads": threads, "onnxruntime": ort.__version__, "cpu": cpu_model(),
            "machine": platform.machine()}


class Clock:
    """Times candidates (or reads them from a table or the cache); keeps every entry by its key.

    `shapes`: value name -> static dims at the shapes the model sees (every activation a target reads must be
    known). `table`: an exported table to plan with (nothing is timed). `cache`: read and extend the user's cache.
    """

    def __init__(self, shapes: Mapping[str, tuple | None], provider: str = "cpu", threads: int = 1,
                 table: str | os.PathLike | None = None, cache: bool = True) -> None:
        self.shapes, self.provider, self.threads = shapes, provider, threads
        self.table = str(table) if table is not None else None
        self.measured = Measured()  # what this run timed, by group
        self.entries: dict[str, float] = {}
        self.dynamic_inputs: list[str] = []  # the model's inputs with dims left unknown (the error names them)
        self.used: set[str] = set()  # the keys this run asked for (what an exported table holds)
        self.cache_path: Path | None = None
        self.timed = self.reused = self.stale = 0
        self.current_probe: float | None = None  # the probe's time in this run (ms), taken once when needed
        self.seconds = 0.0
        if table is not None:
            exported = read_table(table)
            self.context, self.entries = exported.get("context", {}), dict(exported["entries"])
        else:
            self.context = device_context(provider, threads)
            if cache:
                digest = hashlib.sha256(json.dumps(self.context, sort_keys=True).encode()).hexdigest()[:16]
                self.cache_path = cache_folder() / f"latency-{digest}.json"
                self.entries = _read_cache(self.cache_path)

    def group_timing(self, group: WeightGroup, scheme: Scheme, ranks: Sequence[int]) -> LayerTiming:
        """The group's original time and its pairs' at `ranks` of `scheme` (each reader timed and summed);
        ranks a table lacks are left out. Adds to (and returns) the group's timing in `self.measured`."""
        original = 0.0
        totals: dict[int, float] = dict.fromkeys(ranks, 0.0)
        for index, target in enumerate(group.targets):
            own = group.reader_scheme(index, scheme)
            reader_original, times = self.reader_times(target, own, ranks)
            original += reader_original
            for rank in list(totals):
                ms = times.get(rank)
                if ms is None:
                    del totals[rank]
                else:
                    totals[rank] += ms
        timing = self.measured.timings.setdefault(id(group), LayerTiming(original_ms=original))
        timing.original_ms = original
        timing.pair_ms.update({(scheme.name, rank): ms for rank, ms in totals.items()})
        return timing

    def reader_times(self, target: Target, scheme: Scheme, ranks: Sequence[int]
                     ) -> tuple[float, dict[int, float | None]]:
        """One reader's original time and its pairs' (ms), timing together whatever the entries lack (None: a rank
        the table lacks)."""
        layer = layer_key(target, self.shapes)
        keys = {rank: f"{layer}|{scheme.name}|r{rank}" for rank in ranks}
        original_key = f"{layer}|original"
        self.used.update([original_key, *keys.values()])
        if self.table is None and self._stale(layer):
            for key in [key for key in self.entries if key.startswith(f"{layer}|")]:
                del self.entries[key]
            self.stale += 1
        missing = [rank for rank, key in keys.items() if key not in self.entries]
        if self.table is not None:
            if original_key not in self.entries:
                raise NotTimed(f"not in the latency table {self.table}")
        elif missing or original_key not in self.entries:
            started = time.perf_counter()
            models = [original_model(target, self.shapes)] + [pair_model(target, scheme, r, self.shapes)
                                                             for r in missing]
            measured = time_models([m for m, _ in models], models[0][1], self.provider, self.threads)
            self.entries[original_key] = measured[0]
            self.entries.update({keys[rank]: ms for rank, ms in zip(missing, measured[1:])})
            self.entries[f"{layer}|probe"] = self.probe()  # the machine's speed when these were taken
            self.timed += len(models)
            self.seconds += time.perf_counter() - started
            self.save()
        else:
            self.reused += len(keys) + 1
        return self.entries[original_key], {rank: self.entries.get(key) for rank, key in keys.items()}

    def probe(self) -> float:
        """The probe's time now (ms): a fixed MatMul timed on the clock's provider and threads."""
        return probe_ms(self.provider, self.threads)

    def _stale(self, layer: str) -> bool:
        """Whether a layer's cached times were taken while this machine ran at another speed (another load): its
        probe, timed with them, and the probe now differ by more than PROBE_TOLERANCE. Entries of caches written
        before probes were kept are trusted as they are."""
        stored = self.entries.get(f"{layer}|probe")
        if stored is None:
            return False
        if self.current_probe is None:
            self.current_probe = self.probe()
        ratio = self.current_probe / max(stored, 1e-9)
        return not 1 / PROBE_TOLERANCE <= ratio <= PROBE_TOLERANCE

    def save(self) -> None:
        """Write the cache (atomically: a concurrent run never reads half a file)."""
        if self.cache_path is None:
            return
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            staged = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}")
            staged.write_text(json.dumps({"context": self.context, "entries": self.entries}, sort_keys=True))
            os.replace(staged, self.cache_path)
        except OSError:  # a read-only home: the run goes on, it only times again next time
            self.cache_path = None

    def summary(self) -> dict[str, Any]:
        """Where the times came from and what timing cost (merged into the report's `latency`)."""
        return {"provider": self.provider if self.table is None else self.context.get("provider"),
                "threads": self.threads if self.table is None else self.context.get("threads"),
                "source": f"table {self.table}" if self.table else "measured", "context": self.context,
                "cache": str(self.cache_path) if self.cache_path else None, "timed_models": self.timed,
                "reused_entries": self.reused, "stale_layers_retimed": self.stale,
                "timing_s": round(self.seconds, 3), "margin": MARGIN}


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data.get("entries", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):  # none yet, or damaged: time again
        return {}


def read_table(path: str | os.PathLike) -> dict[str, Any]:
    """An exported latency table (onnxlr bench --export-latency-table), checked."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OnnxlrError(f"cannot read the latency table {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("entries"), dict):
        raise OnnxlrError(f"{path} is not an onnxlr latency table (write one with onnxlr bench MODEL "
                          "--export-latency-table FILE)")
    return data


def export_table(model: ir.Model, input_shapes: Mapping[str, Sequence[int]], path: str | os.PathLike,
                 provider: str = "cpu", threads: int = 1, progress: Any = None) -> dict[str, Any]:
    """`onnxlr bench MODEL --export-latency-table FILE`: time every factorizable layer's original node and its
    pairs at every rank a plan may ask for (table_ranks, every view), at `input_shapes`, and write the table.
    Returns its summary (layers, entries, seconds)."""
    from onnxlr.factorize.targets import find_targets
    from onnxlr.model_io.shapes import default_opset, infer_shapes
    from onnxlr.settings import Settings

    shapes = infer_shapes(model, input_shapes)
    context = Context(shapes=shapes, opset=default_opset(model))
    groups, _ = find_targets(model, Settings(), context)
    clock = Clock(shapes, provider, threads)
    timed, unknown = 0, []
    active = [g for g in groups if not g.excluded]
    for group in progress(active, "timing") if progress else active:
        try:
            for scheme in group.schemes:
                clock.group_timing(group, scheme, table_ranks(scheme))
            timed += 1
        except UnknownDims as exc:
            unknown.append(f"{group.lead.name}: {exc}")
        except NotTimed:
            continue
    check_timed(unknown, active, dynamic_inputs(model, shapes))
    entries = {key: clock.entries[key] for key in sorted(clock.used) if key in clock.entries}
    Path(path).write_text(json.dumps({"format": TABLE_FORMAT, "version": TABLE_VERSION, "context": clock.context,
                                      "entries": entries}, indent=1) + "\n")
    return {"file": str(path), "layers": timed, "entries": len(entries), "timing_s": round(clock.seconds, 3),
            "context": clock.context}


# ----------------------------------------------------------------------------- micro-models


def layer_key(target: Target, shapes: Mapping[str, tuple | None]) -> str:
    """What a node's time depends on: op, attributes, and each input's shape and dtype (activations at `shapes`)."""
    node = target.node
    parts = []
    for index, value in enumerate(node.inputs):
        if value is None:
            parts.append("-")
            continue
        array = _constant_input(target, index)
        if array is not None:
            parts.append(f"c{'x'.join(map(str, array.shape))}:{array.dtype}")
        else:
            dims, dtype = _activation_spec(target, value, shapes)
            parts.append(f"{'x'.join(map(str, dims))}:{dtype.name.lower()}")
    attributes = ",".join(f"{name}={_plain(attr.value)}" for name, attr in sorted(node.attributes.items()))
    return f"{node.op_type}({';'.join(parts)}){{{attributes}}}"


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(map(str, value)) + "]"
    return str(value)


def _constant_input(target: Target, index: int) -> np.ndarray | None:
    if index == target.weight_input:
        return target.array
    weight = constant_weight(target.node.inputs[index], inputs_as_constants=target.context.inputs_as_constants)
    return weight.array


def _activation_spec(target: Target, value: ir.Value, shapes: Mapping[str, tuple | None]
                     ) -> tuple[list[int], ir.DataType]:
    dims = shapes.get(value.name or "")
    # An intermediate value's type is often not stored; the ops timed take activations of the weight's type.
    dtype = value.type.dtype if value.type is not None and hasattr(value.type, "dtype") else target.dtype
    if dims is None or not all(isinstance(d, int) and d > 0 for d in dims):
        raise UnknownDims(f"its input {value.name!r} has dims {dims} at the shapes given")
    if dtype is None or dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE,
                                      ir.DataType.BFLOAT16):
        raise NotTimed(f"its input {value.name!r} is not a float tensor")
    return list(dims), dtype


def original_model(target: Target, shapes: Mapping[str, tuple | None]) -> tuple[bytes, dict[str, np.ndarray]]:
    """The node alone: its activations as graph inputs (random feeds), its constants as initializers."""
    model, feeds, _ = _micro(target, shapes)
    return ir.to_proto(model).SerializeToString(), feeds


def pair_model(target: Target, scheme: Scheme, rank: int, shapes: Mapping[str, tuple | None]) -> tuple[bytes, dict]:
    """The node's factor pair at `rank` of `scheme`, as the rule writes it, with random factors."""
    model, feeds, micro = _micro(target, shapes)
    groups, m, n = scheme.matrices.shape
    rng = np.random.default_rng(rank)
    a = rng.standard_normal((groups, m, rank)).astype(np.float32) / math.sqrt(m)
    b = rng.standard_normal((groups, rank, n)).astype(np.float32) / math.sqrt(rank)
    first, second = micro.rule.factor_tensors(micro, scheme, a, b)
    graph = model.graph
    values = []
    for name, array in (("lr_a", first), ("lr_b", second)):
        tensor = ir.Tensor(np.ascontiguousarray(array.astype(target.dtype.numpy())), dtype=target.dtype, name=name)
        value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(target.dtype))
        graph.register_initializer(value)
        values.append(value)
    node = micro.node
    new_nodes = micro.rule.rewrite(micro, scheme, values[0], values[1], NameGenerator(model))
    old_outputs = list(node.outputs)
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, old_outputs,
                                            list(new_nodes[-1].outputs[:len(old_outputs)]))
    for name, value in list(graph.initializers.items()):
        if not value.uses():
            del graph.initializers[name]
    return ir.to_proto(model).SerializeToString(), feeds


def _micro(target: Target, shapes: Mapping[str, tuple | None]) -> tuple[ir.Model, dict[str, np.ndarray], Target]:
    node = target.node
    rng = np.random.default_rng(0)
    inputs, initializers, feeds = [], [], {}
    values: list[ir.Value | None] = []
    for index, original in enumerate(node.inputs):
        if original is None:
            values.append(None)
            continue
        name = original.name or f"input{index}"
        array = _constant_input(target, index)
        if array is not None:
            tensor = ir.Tensor(np.ascontiguousarray(array), name=name)
            value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
            initializers.append(value)
        else:
            dims, dtype = _activation_spec(target, original, shapes)
            value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))
            inputs.append(value)
            feeds[name] = rng.standard_normal(dims).astype(dtype.numpy())
        values.append(value)
    outputs = [ir.Value(name=o.name or "", type=o.type) for o in node.outputs]
    copy = ir.Node(node.domain, node.op_type, inputs=values, attributes=list(node.attributes.values()),
                   outputs=outputs, name=node.name or "target")
    opset = target.context.opset
    graph = ir.Graph(inputs, [o for o in outputs if o.name], nodes=[copy], initializers=initializers,
                     opset_imports={"": opset}, name="onnxlr_latency")
    model = ir.Model(graph, ir_version=_ir_version(opset))
    weight = cast(ir.Value, values[target.weight_input])  # a target's weight input is there
    micro = dataclasses.replace(target, node=copy, weight=weight, sources=(),
                                context=Context(shapes=shapes, opset=opset,
                                                inputs_as_constants=target.context.inputs_as_constants))
    return model, feeds, micro


def _ir_version(opset: int) -> int:
    import onnx

    return max(7, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]))


def probe_ms(provider: str, threads: int, runs: int = 20) -> float:
    """Median milliseconds of the probe: X (256 x 256) times a fixed 256 x 256 weight, after warm-up."""
    from onnx import helper, numpy_helper

    from onnxlr.timing.bench import timer
    from onnxlr.verification.runtime import make_session

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal(PROBE_SHAPE).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "onnxlr_probe",
                              [helper.make_tensor_value_info("x", 1, list(PROBE_SHAPE))],
                              [helper.make_tensor_value_info("y", 1, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    run = timer(make_session(model.SerializeToString(), provider, threads=threads),
                {"x": rng.standard_normal(PROBE_SHAPE).astype(np.float32)})
    for _ in range(WARMUP):
        run()
    return float(np.median([run() for _ in range(runs)])) * 1e3


def time_models(models: Sequence[bytes], feeds: Mapping[str, np.ndarray], provider: str, threads: int) -> list[float]:
    """Median milliseconds of each model on `feeds`, interleaved (0..n, then n..0, ...) after warm-up."""
    from onnxlr.timing.bench import timer
    from onnxlr.verification.runtime import make_session

    sessions = [make_session(m, provider, threads=threads) for m in models]
    runs = [timer(session, feeds) for session in sessions]
    estimate = 0.0
    for run in runs:
        for _ in range(WARMUP - 1):
            run()
        estimate += run()
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, SECONDS_PER_LAYER / max(estimate, 1e-9))))
    times: list[list[float]] = [[] for _ in runs]
    for step in range(rounds):
        order = range(len(runs)) if step % 2 == 0 else reversed(range(len(runs)))
        for index in order:
            times[index].append(runs[index]())
    return [float(np.median(t)) * 1e3 for t in times]


# ----------------------------------------------------------------------------- planning with measured times


def choose_fastest(plan: Plan, group: WeightGroup, options: Sequence[tuple[Scheme, int]], rank_multiple: int, clock: Clock,
                   fits: Callable[[Scheme, int], bool] | None = None) -> bool:
    """Per-layer policies: each option (scheme, policy rank), in the size objective's order of preference, then its
    round-ups to vector multiples. The first pair measured faster than the original is the plan, and a later
    candidate replaces it only when measurably faster than it (a round-up costs parameters; a near tie is noise).
    False when no option gains at all (break-even decides then); a group whose gaining pairs are all slower stays
    dense (`not_faster`). `fits(scheme, rank)`: whether a round-up stays within the policy (--param-ratio)."""
    best: tuple[float, Scheme, int] | None = None
    timing = None
    for scheme, rank in options:
        rank = -(-rank // rank_multiple) * rank_multiple
        ranks = [r for r in rounded_ranks(rank, scheme) if r % rank_multiple == 0
                 and (r == rank or fits is None or fits(scheme, r))]
        if not ranks:
            continue
        timing = clock.group_timing(group, scheme, ranks)
        for r in ranks:
            ms = timing.ms(scheme, r)
            if ms is not None and timing.faster(scheme, r) and (best is None or measurably_faster(ms, best[0])):
                best = (ms, scheme, r)
    if timing is None:
        return False
    if best is None:
        plan.keep_dense(group, "not_faster", f"no factor pair measured {MARGIN:.0%} faster than the original "
                                             f"({timing.original_ms:.3f} ms on {clock.summary()['provider']})")
        return True
    _, scheme, rank = best
    plan.choose(group, scheme, rank)
    return True


def prepare_ladders(plan: Plan, groups: Sequence[WeightGroup], candidates: Callable[[WeightGroup], list[Scheme]], rank_multiple: int,
                    measure: str, clock: Clock, progress: Any = None) -> None:
    """Whole-model budgets: each group's scheme (the fastest at equal energy when views compete) and `ladder`,
    the ranks the allocation may give it: those measured faster than the original. For a latency budget a rank
    no faster than a larger one is dropped too, so time grows along the ladder. A group without any stays
    dense (the allocation says `not_faster`); one that cannot be timed stays dense (`not_timed`)."""
    unknown = []
    for group in progress(groups, "timing") if progress else groups:
        try:
            scheme = _fastest_scheme(plan, group, candidates(group), rank_multiple, clock)
            ranks = ladder_ranks(scheme, rank_multiple)
            timing = clock.group_timing(group, scheme, ranks)
        except UnknownDims as exc:
            unknown.append(f"{group.lead.name}: {exc}")
            plan.keep_dense(group, "not_timed", f"not timed: {exc}")
            continue
        except NotTimed as exc:
            plan.keep_dense(group, "not_timed", f"not timed: {exc}")
            continue
        ladder = [r for r in ranks if timing.faster(scheme, r)]
        if measure == "latency":
            kept, fastest_above = [], math.inf
            for rank in reversed(ladder):
                ms = timing.ms(scheme, rank)
                assert ms is not None  # on the ladder: measured faster
                if ms < fastest_above:
                    kept.append(rank)
                    fastest_above = ms
            ladder = kept[::-1]
        plan.choose(group, scheme)
        clock.measured.ladders[id(group)] = ladder
    check_timed(unknown, groups, clock.dynamic_inputs)


def dynamic_inputs(model: ir.Model, shapes: Mapping[str, tuple | None]) -> list[str]:
    """The model's inputs whose dims stay unknown at `shapes` (what --shape must fix)."""
    return [cast(str, v.name) for v in model.graph.inputs  # ONNX names every graph input
            if not all(isinstance(d, int) and d > 0 for d in (shapes.get(cast(str, v.name)) or [None]))]


def check_timed(unknown: Sequence[str], groups: Sequence[WeightGroup], dynamic_inputs: Sequence[str] = ()) -> None:
    """Every layer untimed for dynamic dims: the run cannot plan by latency; say which shapes to pass."""
    if unknown and len(unknown) == len(groups):
        names = f" ({', '.join(dynamic_inputs)})" if dynamic_inputs else ""
        raise OnnxlrError(f"--objective latency times each layer at the shapes the model sees, but {unknown[0]}: "
                          f"pass --shape NAME:DIMS for the model's dynamic inputs{names} (or --calibration data)")


def _fastest_scheme(plan: Plan, group: WeightGroup, schemes: Sequence[Scheme], rank_multiple: int, clock: Clock) -> Scheme:
    """The view whose pair is fastest at the energy the first view keeps at the middle of its ladder (another view
    than the first only when measurably faster)."""
    reference = schemes[0]
    if len(schemes) == 1:
        return reference
    from onnxlr.factorize import lowrank

    middle = ladder_ranks(reference, rank_multiple)
    if not middle:
        return reference
    energy = plan.svd.decomposition(group, reference).retained_energy(middle[len(middle) // 2])
    best = (math.inf, 0, reference)
    for order, scheme in enumerate(schemes):
        ladder = ladder_ranks(scheme, rank_multiple)
        needed = lowrank.rank_for_energy(plan.svd.decomposition(group, scheme), energy)
        rank = next((r for r in ladder if r >= needed), None)
        if rank is None:
            continue
        ms = clock.group_timing(group, scheme, [rank]).ms(scheme, rank)
        if ms is not None and (order == 0 or best[0] == math.inf or measurably_faster(ms, best[0])):
            best = (ms, order, scheme)
    return best[2]


def plan_summary(plan: Plan, groups: Sequence[WeightGroup], clock: Clock) -> dict[str, Any]:
    """The report's `latency`: each timed layer's plan in total, and how the times were had."""
    timings = {id(g): t for g in groups if (t := clock.measured.timing(g)) is not None}
    timed = [g for g in groups if id(g) in timings]
    decisions = {id(g): plan[g] for g in timed}
    planned = {id(g): ms for g in timed if (d := decisions[id(g)]).factorized and d.scheme is not None
               and d.rank is not None and (ms := timings[id(g)].ms(d.scheme, d.rank)) is not None}
    chosen = [g for g in timed if id(g) in planned]
    # Layers narrowed with a coupled partner are not timed narrowed: their time is estimated at the kept share.
    joint = [(g, role) for g in timed if (role := decisions[id(g)].joint) is not None and role.plan.fit is not None]
    original = sum(timings[id(g)].original_ms for g in timed)
    saving = sum(timings[id(g)].original_ms - planned[id(g)] for g in chosen)
    saving += sum(timings[id(g)].original_ms * (1 - len(role.plan.fit.kept) / role.plan.pair.width)
                  for g, role in joint)
    return {"timed_layers": len(timed), "factorized_timed": len(chosen), "joint_estimated": len(joint),
            "targets_ms": round(original, 4),
            "planned_ms": round(original - saving, 4), "planned_saving_ms": round(saving, 4),
            "planned_saving": round(saving / original, 4) if original else 0.0,
            **clock.summary()}
