"""Settings of the optimize pipeline: every knob of `onnxlr optimize`, its default and its validation.

Settings validate once, when they are made, so every later stage can trust them. Errors name the
setting as a keyword (`rank_ratio`) for the Python API; the CLI shows the flag (`--rank-ratio`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from onnxlr import lowrank
from onnxlr.errors import OnnxlrError
from onnxlr.passes import RULES
from onnxlr.passes.conv import SCHEMES as CONV_SCHEMES

DEFAULT_RANK_RATIO = 0.25
ALL_OPS = tuple(RULES)
# Op types factorized only when --ops names them: Gather, an embedding table's lookup (it trades the
# table's bytes for a small product per looked-up row, so it is never a default).
OPT_IN_OPS = ("Gather",)
MAX_DEFAULT_JOBS = 8
POLICIES = ("rank_ratio", "rank", "energy", "param_ratio", "param_budget", "mac_budget", "target_cosine",
            "target_error", "latency_budget")

# Settings added after the first release, with their defaults: left out of recorded() (the settings
# recorded in the written model) while at the default.
LATER_DEFAULTS = {"inputs_as_constants": False, "methods": None, "quantize": None, "objective": "size",
                  "latency_budget": None, "latency_provider": "cpu", "latency_threads": 1, "latency_table": None,
                  "latency_cache": True}
# What planning minimizes for the rank policy: "size" (parameters and MACs) or "latency" (every candidate pair
# timed against its original node with onnxruntime; only pairs measured faster are planned: onnxlr.latency).
OBJECTIVES = ("size", "latency")
# How weights may be compressed: "svd" (each weight its own factor pair) and "joint" (a coupled MLP pair
# keeps k of its D inner neurons and refits the second layer on calibration data; onnxlr.coupled).
METHODS = ("svd", "joint")
# onnxruntime quantization after the rewrite (onnxlr.quantize).
QUANTIZE_MODES = ("int8", "int8-static", "fp16")
# Op types whose rules came after the first release, at the end of ALL_OPS: while `ops` is the default
# (all of them), recorded() leaves these out of the recorded `ops`, so a default run writes the same
# bytes as before they existed (a recorded MatMul,Gemm,Conv then means the default or exactly those;
# the recorded onnxlr.version tells which ops the default had).
LATER_OPS = ("LSTM", "GRU", "RNN")
assert ALL_OPS[-len(LATER_OPS):] == LATER_OPS

# A progress hook wraps an iterable: progress(items, description) -> items (rich bar in the CLI).
Progress = Callable[[Sequence[Any], str], Iterable[Any]]


def no_progress(items: Sequence[Any], _description: str) -> Iterable[Any]:
    return items


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
    # Initializers listed as graph inputs are constant weights (IR >= 4 models that list them; IR < 4: always).
    inputs_as_constants: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ops: tuple[str, ...] = ALL_OPS
    conv_scheme: str = "auto"
    compensate: bool = False
    methods: tuple[str, ...] | None = None  # None: svd,joint with calibration data, svd without
    quantize: str | None = None  # one of QUANTIZE_MODES: onnxruntime's quantizer after the rewrite
    objective: str = "size"  # one of OBJECTIVES; latency_budget and latency_table imply "latency"
    latency_budget: float | None = None  # rank policy: keep <= this fraction of the targets' measured time
    latency_provider: str = "cpu"  # where --objective latency times candidates (onnxlr.runtime.PROVIDERS)
    latency_threads: int = 1  # onnxruntime intra-op threads of the timing sessions (0: onnxruntime's default)
    latency_table: str | None = None  # plan with an exported table (bench --export-latency-table), time nothing
    latency_cache: bool = True  # read and extend the user's cache of measured times
    svd: str = "auto"
    device: str = "cpu"
    jobs: int | None = None  # None: one per available core (up to MAX_DEFAULT_JOBS); never changes the output

    def __post_init__(self) -> None:
        if self.jobs is None:
            object.__setattr__(self, "jobs", default_jobs())
        policies = self.policies()
        if len(policies) > 1:
            raise OnnxlrError(f"choose one rank policy, not {len(policies)}: "
                              + ", ".join(f"{{{i}}}" for i in range(len(policies))), *policies)
        if not policies:
            object.__setattr__(self, "rank_ratio", DEFAULT_RANK_RATIO)
        for name in ("rank_ratio", "energy", "param_ratio", "param_budget", "mac_budget", "target_cosine",
                     "latency_budget"):
            _check_fraction(name, getattr(self, name))
        self._check_latency()
        if self.target_error is not None and (isinstance(self.target_error, bool)
                                              or not isinstance(self.target_error, (int, float))
                                              or not math.isfinite(self.target_error) or self.target_error <= 0):
            raise OnnxlrError(f"{{0}} must be a positive number, got {self.target_error!r}", "target_error")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise OnnxlrError(f"{{0}} must be a positive integer, got {self.rank!r}", "rank")
        if not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise OnnxlrError(f"{{0}} must be a positive integer, got {self.rank_multiple!r}", "rank_multiple")
        if not isinstance(self.min_params, int) or self.min_params < 0:
            raise OnnxlrError(f"{{0}} must be a non-negative integer, got {self.min_params!r}", "min_params")
        if not isinstance(self.inputs_as_constants, bool):
            raise OnnxlrError(f"{{0}} must be True or False, got {self.inputs_as_constants!r}", "inputs_as_constants")
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        if self.methods is not None and (not self.methods or any(m not in METHODS for m in self.methods)
                                         or "svd" not in self.methods):
            raise OnnxlrError(f"{{0}} must be svd or svd,joint; got {','.join(self.methods) or 'nothing'}", "methods")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise OnnxlrError(f"{{0}} must be one of {', '.join(QUANTIZE_MODES)}; got {self.quantize!r}", "quantize")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        unknown = [op for op in self.ops if op not in RULES and op not in OPT_IN_OPS]
        if unknown:
            raise OnnxlrError(f"unsupported op type(s) {', '.join(unknown)}; choose from "
                              f"{', '.join((*RULES, *OPT_IN_OPS))}")
        if self.conv_scheme not in ("auto", *CONV_SCHEMES):
            raise OnnxlrError(f"{{0}} must be auto, {', '.join(CONV_SCHEMES)}; got {self.conv_scheme!r}",
                              "conv_scheme")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise OnnxlrError(f"{{0}} must be a positive integer, got {self.jobs!r}", "jobs")
        lowrank.check_device(self.solver.device)  # validates svd and device first

    def _check_latency(self) -> None:
        from onnxlr.runtime import PROVIDERS

        if self.objective not in OBJECTIVES:
            raise OnnxlrError(f"{{0}} must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}", "objective")
        if self.latency_budget is not None or self.latency_table is not None:
            object.__setattr__(self, "objective", "latency")
        if self.latency_provider not in PROVIDERS:
            raise OnnxlrError(f"{{0}} must be one of {', '.join(PROVIDERS)}; got {self.latency_provider!r}",
                              "latency_provider")
        if isinstance(self.latency_threads, bool) or not isinstance(self.latency_threads, int) or self.latency_threads < 0:
            raise OnnxlrError(f"{{0}} must be a non-negative integer, got {self.latency_threads!r}", "latency_threads")
        if not isinstance(self.latency_cache, bool):
            raise OnnxlrError(f"{{0}} must be True or False, got {self.latency_cache!r}", "latency_cache")

    @property
    def solver(self) -> lowrank.Solver:
        return lowrank.Solver(svd=self.svd, device=self.device)

    def policies(self) -> list[str]:
        return [name for name in POLICIES if getattr(self, name) is not None]

    @property
    def budget(self) -> tuple[str, float] | None:
        """The whole-model budget, ("params", "macs" or "latency", fraction kept), when one is the policy."""
        if self.param_budget is not None:
            return "params", self.param_budget
        if self.mac_budget is not None:
            return "macs", self.mac_budget
        if self.latency_budget is not None:
            return "latency", self.latency_budget
        return None

    @property
    def budget_setting(self) -> str:
        """The name of the budget setting in force (param_budget, mac_budget or latency_budget)."""
        return {"params": "param_budget", "macs": "mac_budget", "latency": "latency_budget"}[
            self.budget[0] if self.budget else "params"]

    def as_dict(self) -> dict[str, Any]:
        """Every setting (the report's `settings`)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def recorded(self) -> dict[str, Any]:
        """The settings a written model records (metadata `onnxlr.settings`).

        --jobs changes how fast, not what, so it stays out; settings added later stay out while at their
        default, so a run that does not use them writes the same bytes as before they existed."""
        recorded = {k: v for k, v in self.as_dict().items()
                    if k != "jobs" and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
        if self.ops == ALL_OPS:
            recorded["ops"] = [op for op in ALL_OPS if op not in LATER_OPS]
        return recorded


def _check_fraction(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OnnxlrError(f"{{0}} must be a number in (0, 1], got {value!r}", name)
    if not (0 < value <= 1):
        raise OnnxlrError(f"{{0}} must be in (0, 1], got {value}", name)
