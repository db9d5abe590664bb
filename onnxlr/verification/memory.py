"""Know the memory before spending it: what an onnxruntime session of a model will take, against what is free.

Verification and calibration run whole models in onnxruntime; on a model larger than memory the kernel kills
the process without a word, hours in. Before either starts, `check` estimates the session's peak (its weights,
which onnxruntime copies and prepacks, and the activations live at once at the batch used) against the memory
available (MemAvailable, and the cgroup's limit less its usage), and stops the run with one line saying what to
pass when it does not fit. `$ONNXLR_MEMORY_LIMIT` (bytes, or 8GB / 16GiB) replaces the detected figure (a
container whose limit is not visible); `--no-memory-check` skips the check.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir

from onnxlr.errors import OnnxlrError

# An onnxruntime CPU session holds about this many bytes per byte of weights: its own copy of every initializer
# (prepacked MatMul weights replace theirs). Measured: a session of the 1.06B-parameter llm-1b reference (4.22 GB
# of fp32 external data) peaked at 4.08 GB of anonymous memory running a batch of 16 (onnxruntime 1.32, CPU);
# 1.1 keeps a margin.
SESSION_WEIGHT_FACTOR = 1.1
SESSION_OVERHEAD_BYTES = 200 << 20  # the runtime itself, kernels' scratch and the arena's slack
MEMORY_LIMIT_ENV = "ONNXLR_MEMORY_LIMIT"
# The whitened SVD of a layer holds about this many more copies of its K x K Gram while it runs (onnxlr.factorize.lowrank).
WHITENING_COPIES = 5


@dataclasses.dataclass
class Available:
    bytes: int
    source: str  # where the figure comes from (MemAvailable, cgroup, $ONNXLR_MEMORY_LIMIT)


def available(meminfo: str | os.PathLike = "/proc/meminfo", cgroup: str | os.PathLike = "/sys/fs/cgroup"
              ) -> Available | None:
    """The memory this process may still take: the smallest of MemAvailable and the cgroup's limit less its usage
    (cgroup v2, else v1); `$ONNXLR_MEMORY_LIMIT` instead when set. None when nothing can be read."""
    override = os.environ.get(MEMORY_LIMIT_ENV)
    if override:
        return Available(parse_size(override), f"${MEMORY_LIMIT_ENV}")
    found = []
    try:
        text = Path(meminfo).read_text()
        match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
        if match:
            found.append(Available(int(match.group(1)) * 1024, "MemAvailable"))
    except OSError:
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path(cgroup, limit_file).read_text().strip()
            usage = int(Path(cgroup, usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or v1's huge sentinel: no limit
            found.append(Available(max(int(limit) - usage, 0), "cgroup limit"))
        break
    return min(found, key=lambda a: a.bytes) if found else None


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise OnnxlrError(f"${MEMORY_LIMIT_ENV}={text!r} is not a size such as 8000000000, 8GB or 16GiB")
    base = 1024 if match.group(3) or not match.group(2) else 1000
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * base**power)


def peak_activation_bytes(model: ir.Model, shapes: Mapping[str, tuple | None]) -> float:
    """The most activation bytes live at once when the main graph runs in order (each value freed after its last
    reader; unknown dims count as 1): what onnxruntime's arena must hold at that batch, roughly."""
    nodes = list(model.graph)
    last_use: dict[int, int] = {}
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None:
                last_use[id(value)] = index
    outputs = {id(v) for v in model.graph.outputs}
    live: dict[int, float] = {id(v): _value_bytes(v, shapes) for v in model.graph.inputs if v.const_value is None}
    peak = sum(live.values())
    for index, node in enumerate(nodes):
        for value in node.outputs:
            if node.op_type != "Constant":
                live[id(value)] = _value_bytes(value, shapes)
        peak = max(peak, sum(live.values()))
        for value in node.inputs:
            if value is not None and last_use.get(id(value)) == index and id(value) not in outputs:
                live.pop(id(value), None)
    return peak


def input_bytes(model: ir.Model, shapes: Mapping[str, tuple | None]) -> float:
    """The bytes of the main graph's inputs (not initializers) at `shapes`."""
    return sum(_value_bytes(v, shapes) for v in model.graph.inputs if v.const_value is None)


def _value_bytes(value: ir.Value, shapes: Mapping[str, tuple | None]) -> float:
    """Bytes of the value at `shapes`: a float (onnx-ir's itemsize is one; a 4-bit element takes 0.5)."""
    dims = shapes.get(value.name or "")
    dtype = value.type.dtype if value.type is not None and hasattr(value.type, "dtype") else ir.DataType.FLOAT
    if dims is None:
        return 0
    count = 1
    for dim in dims:
        count *= dim if isinstance(dim, int) and dim > 0 else 1
    try:
        return count * dtype.itemsize
    except (TypeError, AttributeError):  # strings and sub-byte types: not worth counting here
        return count


def session_bytes(weight_bytes: int, activation_bytes: float) -> float:
    """An onnxruntime CPU session's peak for a model with these weights, at these live activations."""
    return int(SESSION_WEIGHT_FACTOR * weight_bytes) + activation_bytes + SESSION_OVERHEAD_BYTES


# Segments smaller than this would spend the run creating sessions: below it, verification is refused instead.
MIN_SEGMENT_BYTES = 16 << 20
# Segments larger than this run no faster (a session's creation time follows its bytes either way), and what they
# would take is better left to the page cache that feeds them (and to the rest of the machine): one decoder layer
# of an 8B-parameter fp16 model is 0.49 GB (0.35 GB its MLP): at 256 MB the 8B reference verifies with a peak
# of about 1.x GB.
MAX_SEGMENT_BYTES = 256 << 20
# Above this many bytes of weights verification runs in segments even when the whole model would fit: measured
# on the 1.06B-parameter llm-1b (4.2 GB), segments took less time than one whole session (203 s vs 227 s for
# optimize) at half the peak memory, and an 8B model's 16 GB would otherwise take most of a 24 GB machine.
SEGMENTED_ABOVE_BYTES = 2 << 30


def fits(weight_bytes: int, activation_bytes: float, free: Available | None) -> bool:
    return free is None or session_bytes(weight_bytes, activation_bytes) <= free.bytes


def segment_budget(activation_bytes: float, free: Available | None) -> int | None:
    """Weight bytes per segment that keep one segment's session within the memory available, at most
    MAX_SEGMENT_BYTES (None: none can; MAX_SEGMENT_BYTES when the memory available is unknown)."""
    if free is None:
        return MAX_SEGMENT_BYTES
    budget = int((free.bytes - activation_bytes - SESSION_OVERHEAD_BYTES) / SESSION_WEIGHT_FACTOR)
    return min(budget, MAX_SEGMENT_BYTES) if budget >= MIN_SEGMENT_BYTES else None


def check(stage: str, weight_bytes: int, activation_bytes: float, advice: str,
          free: Available | None = None, statistics_bytes: int = 0) -> None:
    """Stop before `stage` (one line, exit 2) when its session, beside `statistics_bytes` (calibration's Gram
    matrices), would not fit in the memory available."""
    free = free if free is not None else available()
    need = session_bytes(weight_bytes, activation_bytes) + statistics_bytes
    if free is None or need <= free.bytes:
        return
    statistics = f", {gb(statistics_bytes)} of calibration statistics" if statistics_bytes else ""
    raise OnnxlrError(f"{stage} would need about {gb(need)} in onnxruntime ({gb(weight_bytes)} of weights x "
                      f"{SESSION_WEIGHT_FACTOR}, {gb(activation_bytes)} of activations at the batch used{statistics}) "
                      f"but {gb(free.bytes)} is available ({free.source}): {advice}; --no-memory-check runs it anyway")


def gb(count: float) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"
