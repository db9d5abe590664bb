"""Latency ESTIMATES for edge targets from onnxlr's cost model and a roofline per node.

For each node: time = max(flops / peak, bytes_moved / bandwidth) + overhead, with bytes_moved =
weight_bytes + input_bytes + output_bytes (cost.NodeCost); the model's time is the sum over nodes.
The roofline assumes every node reaches the device's peak compute or peak bandwidth, nothing
stays in cache between nodes, and nodes run one after another. It is an estimate from published
(or derived) peak figures, never a measurement; `onnxlr bench` measures on this machine.

Profiles come from onnxlr/data/devices.toml and an optional user file in the same schema.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from onnxlr.errors import OnnxlrError
from onnxlr.factorize.cost import NodeCost, model_costs
from onnxlr.model_io.shapes import infer_shapes

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

LABEL = "estimate (roofline)"
BUILTIN = "onnxlr/data/devices.toml"
PRECISIONS = ("fp32", "fp16")
FIGURES = ("peak_gflops", "bandwidth_gbs", "overhead_us")
FIGURE_KEYS = {"value", "source", "derived", "derivation"}
TARGET_KEYS = {"name", "kind", *FIGURES}


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float
    source: str
    derived: bool
    derivation: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    name: str
    kind: str
    peak_gflops: Mapping[str, Figure]  # by precision; fp32 always present
    bandwidth_gbs: Figure
    overhead_us: Figure
    origin: str  # the file it came from

    def peak(self, precision: str) -> tuple[str, Figure]:
        """The precision actually used and its peak: fp32 where the target has no figure for `precision`."""
        if precision in self.peak_gflops:
            return precision, self.peak_gflops[precision]
        return "fp32", self.peak_gflops["fp32"]


# ----------------------------------------------------------------------------- loading and validation


def load_targets(user_file: str | Path | None = None) -> dict[str, Target]:
    """Built-in targets, then the user's (a user target with a built-in key replaces it)."""
    text = resources.files("onnxlr").joinpath("data/devices.toml").read_text(encoding="utf-8")
    targets = parse_targets(_parse_toml(text, BUILTIN), BUILTIN)
    if user_file is not None:
        try:
            text = Path(user_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OnnxlrError(f"--targets {user_file}: cannot read it: {exc}") from exc
        targets.update(parse_targets(_parse_toml(text, str(user_file)), str(user_file)))
    return targets


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OnnxlrError(f"{origin}: not valid TOML: {exc}") from exc


def parse_targets(data: Mapping[str, Any], origin: str) -> dict[str, Target]:
    """Validate a parsed targets file: one table per target, each figure with value, source and derived."""
    if not data:
        raise OnnxlrError(f"{origin}: no targets; expected tables such as [my-board] (see the README)")
    return {key: _target(key, table, origin) for key, table in data.items()}


def _target(key: str, table: Any, origin: str) -> Target:
    where = f"{origin}: target [{key}]"
    if not isinstance(table, dict):
        raise OnnxlrError(f"{where}: expected a table with name, peak_gflops, bandwidth_gbs, overhead_us")
    unknown = sorted(set(table) - TARGET_KEYS)
    if unknown:
        raise OnnxlrError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TARGET_KEYS))}")
    missing = [name for name in ("name", *FIGURES) if name not in table]
    if missing:
        raise OnnxlrError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(table["name"], str) or not table["name"].strip():
        raise OnnxlrError(f"{where}: name must be a non-empty string")
    peaks = table["peak_gflops"]
    if not isinstance(peaks, dict) or "fp32" not in peaks:
        raise OnnxlrError(f"{where}: peak_gflops needs a table per precision, at least [{key}.peak_gflops.fp32]")
    bad = sorted(set(peaks) - set(PRECISIONS))
    if bad:
        raise OnnxlrError(f"{where}: unknown precision(s) {', '.join(bad)} in peak_gflops; allowed: fp32, fp16")
    return Target(
        key=key, name=table["name"], kind=str(table.get("kind", "")), origin=origin,
        peak_gflops={p: _figure(peaks[p], f"{where} peak_gflops.{p}", positive=True) for p in peaks},
        bandwidth_gbs=_figure(table["bandwidth_gbs"], f"{where} bandwidth_gbs", positive=True),
        overhead_us=_figure(table["overhead_us"], f"{where} overhead_us", positive=False),
    )


def _figure(table: Any, where: str, positive: bool) -> Figure:
    # Every figure carries its provenance, so a report can always say where a number came from.
    if not isinstance(table, dict):
        raise OnnxlrError(f"{where}: expected a table {{value, source, derived[, derivation]}}")
    unknown = sorted(set(table) - FIGURE_KEYS)
    if unknown:
        raise OnnxlrError(f"{where}: unknown key(s) {', '.join(unknown)}")
    value = table.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise OnnxlrError(f"{where}: value must be a number")
    if value < 0 or (positive and value == 0) or value == float("inf"):
        raise OnnxlrError(f"{where}: value must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    source = table.get("source")
    if not isinstance(source, str) or not source.strip():
        raise OnnxlrError(f"{where}: source must say where the figure comes from (a URL or document)")
    derived = table.get("derived")
    if not isinstance(derived, bool):
        raise OnnxlrError(f"{where}: derived must be true or false")
    derivation = table.get("derivation", "")
    if not isinstance(derivation, str) or (derived and not derivation.strip()):
        raise OnnxlrError(f"{where}: a derived figure needs a derivation string (the formula)")
    return Figure(value=float(value), source=source, derived=derived, derivation=derivation)


# ----------------------------------------------------------------------------- roofline


def node_time_s(cost: NodeCost, peak_gflops: float, bandwidth_gbs: float, overhead_us: float) -> tuple[float, str]:
    """Roofline seconds of one node and what bounds it ("compute" or "memory"; a tie counts as memory)."""
    compute = cost.flops / (peak_gflops * 1e9)
    memory = (cost.weight_bytes + cost.input_bytes + cost.output_bytes) / (bandwidth_gbs * 1e9)
    return max(compute, memory) + overhead_us * 1e-6, "compute" if compute > memory else "memory"


def estimate(costs: Iterable[NodeCost], target: Target, precision: str = "fp32") -> dict[str, Any]:
    """Sum of node roofline times on `target`, in milliseconds, with the count of each bound."""
    used, peak = target.peak(precision)
    total, bounds = 0.0, {"compute": 0, "memory": 0}
    for cost in costs:
        seconds, bound = node_time_s(cost, peak.value, target.bandwidth_gbs.value, target.overhead_us.value)
        total += seconds
        bounds[bound] += 1
    return {"estimate_ms": total * 1e3, "compute_bound_nodes": bounds["compute"],
            "memory_bound_nodes": bounds["memory"], "precision": used}


def describe(target: Target, precision: str) -> dict[str, Any]:
    """Where the target's figures come from: the file, and each figure used with its source."""
    used, peak = target.peak(precision)
    return {
        "name": target.name,
        "label": LABEL,
        "source": target.origin,
        "figures": {f"peak_gflops.{used}": peak.as_dict(), "bandwidth_gbs": target.bandwidth_gbs.as_dict(),
                    "overhead_us": target.overhead_us.as_dict()},
    }


def compare(models: Sequence[tuple[str, list[NodeCost]]], targets: Mapping[str, Target], precision: str
            ) -> dict[str, dict[str, Any]]:
    """Per target: each model's estimate and, for two models, the estimated speedup first/second."""
    result = {}
    for key, target in targets.items():
        entry = describe(target, precision)
        entry["models"] = [{"model": name, **estimate(costs, target, precision)} for name, costs in models]
        if len(models) == 2:
            entry["speedup_estimate"] = _ratio(entry["models"][0]["estimate_ms"], entry["models"][1]["estimate_ms"])
        result[key] = entry
    return result


def before_after(before: list[NodeCost], after: list[NodeCost], targets: Mapping[str, Target], precision: str
                 ) -> dict[str, dict[str, Any]]:
    """optimize's report["targets"]: per target the estimate before and after, and the speedup estimate."""
    result = {}
    for key, target in targets.items():
        entry = describe(target, precision)
        entry["before"] = estimate(before, target, precision)
        entry["after"] = estimate(after, target, precision)
        entry["speedup_estimate"] = _ratio(entry["before"]["estimate_ms"], entry["after"]["estimate_ms"])
        result[key] = entry
    return result


def _ratio(before: float, after: float) -> float | None:
    return before / after if after > 0 else None


# ----------------------------------------------------------------------------- models


def model_precision(model: Any) -> str:
    """fp16 when most float weight bytes are fp16 or bf16, else fp32 (the default)."""
    import onnx_ir as ir

    half = full = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            if tensor.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                half += tensor.nbytes
            elif tensor.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
                full += tensor.nbytes
    return "fp16" if half > full else "fp32"


def node_costs(model: Any, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[NodeCost]:
    """The cost model's per-node figures for an onnx-ir model (shapes from ONNX inference)."""
    return model_costs(model, infer_shapes(model, input_shapes))


def for_bench(model_paths: Sequence[str], feeds: Mapping[str, Any], user_file: str | None) -> dict[str, Any]:
    """bench's `targets`: every target's estimate for each model, at the shapes of the timed inputs."""
    from onnxlr.model_io import io

    shapes = {name: list(array.shape) for name, array in feeds.items()}
    loaded = [io.load(path).model for path in model_paths]
    models = [(str(path), node_costs(model, shapes)) for path, model in zip(model_paths, loaded)]
    return compare(models, load_targets(user_file), model_precision(loaded[0]))
