"""Settings of the optimize pipeline: every knob of `onnxlr optimize`, declared once with its type, default,
validation and help (a field's metadata, `setting(...)`); the CLI's options and the CLI reference are generated from
these declarations (onnxlr.cli.options), and the rank policy is one typed value (onnxlr.policies).

Settings validate once, when they are made, so every later stage can trust them. Errors name the
setting as a keyword (`rank_ratio`) for the Python API; the CLI shows the flag (`--rank-ratio`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from onnxlr import policies
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank
from onnxlr.passes import RULES
from onnxlr.passes.conv import SCHEMES as CONV_SCHEMES
from onnxlr.policies import DEFAULT_RANK_RATIO, Budget, Goal, LatencyBudget, RankPolicy, RankRatio

ALL_OPS = tuple(RULES)
# Op types factorized only when --ops names them: Gather, an embedding table's lookup (it trades the
# table's bytes for a small product per looked-up row, so it is never a default).
OPT_IN_OPS = ("Gather",)
MAX_DEFAULT_JOBS = 8

# Settings added after the first release, with their defaults: left out of recorded() (the settings
# recorded in the written model) while at the default.
LATER_DEFAULTS = {"inputs_as_constants": False, "methods": None, "quantize": None, "objective": "size",
                  "latency_budget": None, "latency_provider": "cpu", "latency_threads": 1, "latency_table": None,
                  "latency_cache": True, "correction_rank": 0, "correction_dtype": "float16", "quantize_block": 32,
                  "correction_allocation": "uniform", "size_budget": None,
                  "quantize_symmetric": True, "target_top1": None, "target_neighbours": None}
# What planning minimizes for the rank policy: "size" (parameters and MACs) or "latency" (every candidate pair
# timed against its original node with onnxruntime; only pairs measured faster are planned: onnxlr.timing.latency).
OBJECTIVES = ("size", "latency")
# How weights may be compressed: "svd" (each weight its own factor pair) and "joint" (a coupled MLP pair
# keeps k of its D inner neurons and refits the second layer on calibration data; onnxlr.coupled.plans).
METHODS = ("svd", "joint")
# onnxruntime quantization after the rewrite (onnxlr.factorize.quantize).
QUANTIZE_MODES = ("int8", "int8-static", "fp16", "int4", "auto")
# How a low-rank correction of quantization error stores its factors (onnxlr.factorize.correction).
CORRECTION_DTYPES = ("float16", "int8", "float32")
# How a correction's ranks are shared among layers: the same rank each, or the bytes of that rank spent where they
# remove the most measured output error (onnxlr.factorize.correction.allocate).
CORRECTION_ALLOCATIONS = ("uniform", "measured")
INT4_BLOCKS = (16, 32, 64, 128, 256)
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


def setting(default: Any, help: str, group: str, *, kind: str = "", choices: Sequence[str] = (), flag: str = "",
            metavar: str = "", parse: Callable[[Any], Any] | None = None, negated: bool = False,
            multiple: bool = False, path: str = "", bounds: tuple[float, float] = (-math.inf, math.inf),
            show_default: bool = True) -> Any:
    """A settings field with its CLI declaration: `group` (the --help section), `kind` (how it is checked: "count"
    an integer >= 1, "natural" >= 0, "int", "bool", "choice" one of `choices`, "number" within `bounds`), `flag`
    (when not "--" + the name), `parse` (the CLI's text -> value: comma lists, shapes), `negated` (a --no-... flag
    that sets it False), `multiple` (repeatable), `path` ("existing": a file that exists; "file": any file path).
    An empty group: no flag of its own (set from another option, or by the command itself)."""
    metadata = {"help": help, "group": group, "kind": kind, "choices": tuple(choices), "flag": flag,
                "metavar": metavar, "parse": parse, "negated": negated, "multiple": multiple, "path": path,
                "bounds": bounds, "show_default": show_default}
    if isinstance(default, (dict, list)):  # a fresh one per instance
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def split_list(text: str | None) -> tuple[str, ...]:
    """A comma-separated flag value (--ops, --methods, --providers) as its items, blanks dropped."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def split_ops(text: str) -> tuple[str, ...]:
    ops = split_list(text)
    if not ops:
        raise OnnxlrError("--ops is empty; give op types such as MatMul,Gemm,Conv")
    return ops


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of `onnxlr optimize`'s factorization; the same names as the CLI flags (`Settings.of(rank_ratio=0.5)`
    takes the rank policy as its keyword)."""

    policy: RankPolicy = RankRatio(DEFAULT_RANK_RATIO)  # one of onnxlr.policies.POLICIES
    rank_multiple: int = setting(1, "Round ranks up to a multiple of M (tensor cores), never past break-even.",
                                 "policy", kind="count", metavar="M")
    allow_no_gain: bool = setting(False, "Emit factorizations even when they are not smaller or cheaper (e.g. to "
                                  "test exactness).", "policy", kind="bool")
    min_params: int = setting(0, "Skip weights with fewer than N parameters.", "targets", kind="natural", metavar="N")
    # Initializers listed as graph inputs are constant weights (IR >= 4 models that list them; IR < 4: always).
    inputs_as_constants: bool = setting(
        False, "Initializers listed as graph inputs are treated as constant weights (factorized, and dropped from the "
        "inputs when replaced), for IR >= 4 models that list them; IR < 4 does this always.", "targets", kind="bool")
    include: tuple[str, ...] = setting((), "Only nodes whose name matches (repeatable).", "targets", metavar="GLOB",
                                       multiple=True, show_default=False)
    exclude: tuple[str, ...] = setting((), "Skip nodes whose name matches (repeatable).", "targets", metavar="GLOB",
                                       multiple=True, show_default=False)
    ops: tuple[str, ...] = setting(ALL_OPS, "Comma-separated op types to factorize.", "targets", metavar="LIST",
                                   parse=split_ops)
    conv_scheme: str = setting("auto", "Conv split: output (kxk then 1x1), input (1x1 then kxk), spatial (kx1 then "
                               "1xk); auto picks the fewest MACs at equal error.", "targets", kind="choice",
                               choices=("auto", *CONV_SCHEMES))
    compensate: bool = setting(False, "With --calibration: refit layer by layer on the inputs of the partially "
                               "factorized model, so later layers correct what earlier ones lost (one calibration pass "
                               "per stage).", "calibration", kind="bool")
    methods: tuple[str, ...] | None = setting(
        None, "svd: each weight its own factor pair. svd,joint: also coupled pairs (MLP, gated MLP and conv channel "
        "pairs, attention V·O and Q·Kᵀ heads) may keep k of their inner neurons (head dimensions), fitted on the "
        "--calibration data, where that loses less output error than the pair's per-matrix plan at the same cost "
        "(whole-model budgets allocate across both). Default: svd,joint with --calibration, svd without.",
        "methods", metavar="LIST", parse=split_list)
    quantize: str | None = setting(
        None, "After the rewrite, quantize with onnxruntime's tools: int8 (dynamic, per-channel INT8 weights), "
        "int8-static (QDQ, calibrated on --calibration; a model with normalization or softmax ops gets only its "
        "weighted MatMul/Gemm/Conv nodes in QDQ), fp16 (float16 weights and compute, float32 inputs and "
        "outputs). Verification and --target-cosine/--target-error measure the quantized model (the search takes the "
        "quantizer's own loss, measured on the original, off the goal). int4: 4-bit weight-only MatMuls "
        "(onnxruntime's MatMulNBits, RTN, block 32, symmetric) and 4-bit embedding tables (GatherBlockQuantized; the "
        "model is converted to opset 21 for them). auto (with --calibration, and --target-cosine/--target-error with "
        "held-out --inputs, or --size-budget): each MatMul float, 8-bit, 4-bit or 4-bit with a low-rank correction, "
        "each embedding table float or 4-bit, planned together for the fewest bytes that meet the target (or the "
        "least error within the budget); no layer is factorized.", "methods", kind="choice", choices=QUANTIZE_MODES)
    correction_rank: int = setting(
        0, "With --quantize int4 and --calibration: correct each 4-bit MatMul's quantization error with a rank-R "
        "pair beside it, y = Q(W)x + (x·A)·B, fitted by the activation-whitened SVD of W - Q(W) (LQER). 0: none.",
        "methods", kind="natural", metavar="R")
    correction_dtype: str = setting(
        "float16", "How the correction's factors are stored: float16, int8 (per column, symmetric, onnxruntime's "
        "quantize_data; a DequantizeLinear reads them: a quarter of float32's bytes), or float32 (exact at full "
        "rank).", "methods", kind="choice", choices=CORRECTION_DTYPES)
    correction_allocation: str = setting(
        "uniform", "uniform: rank R in every corrected layer. measured: the factor bytes of rank R everywhere, shared "
        "out where they remove the most output error: each layer's quantized weight is fed alone on the first "
        "--calibration samples, and each direction of its whitened error is worth its share of that.", "methods",
        kind="choice", choices=CORRECTION_ALLOCATIONS)
    quantize_block: int = setting(
        32, "--quantize int4: weights per scale (16, 32, 64, 128 or 256); larger blocks store fewer scales and "
        "lose more.", "methods", kind="count", metavar="N")
    quantize_symmetric: bool = setting(
        True, "--quantize int4: store a zero point per block (asymmetric, uint4) instead of none (symmetric, int4): on "
        "MiniLM's MatMuls 0.9749 against 0.9672 cosine for 2.5% more bytes, and at block 64 the fidelity of symmetric "
        "block 32 in 0.91x its bytes. --quantize auto plans both.", "methods", kind="bool",
        flag="--quantize-asymmetric", negated=True)
    objective: str = setting(
        "size", "What the rank policy optimizes. latency: every candidate factor pair (layer, scheme, rank, its "
        "round-ups to multiples of 8) is timed against its original node with onnxruntime, on the first of "
        "--providers with --threads, at the shapes the model sees (--shape, else the --calibration or --inputs batch); "
        "only pairs measured 5% faster are kept, budgets allocate over them. Times are cached in ~/.cache/onnxlr.",
        "latency", kind="choice", choices=OBJECTIVES)
    # where --objective latency times candidates (onnxlr.verification.runtime.PROVIDERS): the first of --providers
    latency_provider: str = setting("cpu", "", "")
    latency_threads: int = setting(1, "onnxruntime intra-op threads when timing candidates (0: onnxruntime's "
                                   "default), as in `onnxlr bench --threads`.", "latency", kind="natural",
                                   flag="--threads")
    latency_table: str | None = setting(
        None, "Plan with the times `onnxlr bench MODEL --export-latency-table FILE.json` measured on the target device "
        "(implies --objective latency); nothing is timed here.", "latency", metavar="FILE.json", path="existing")
    latency_cache: bool = setting(True, "Time every candidate again (the cache of measured times is neither read nor "
                                  "written).", "latency", kind="bool", flag="--no-cache", negated=True)
    svd: str = setting("auto", "exact: LAPACK (gesdd, gesvd fallback). randomized: randomized range finder for the "
                       "leading triplets when the rank is known before the SVD. auto: randomized only for large "
                       "matrices at a small rank (checked against the exact tail where affordable), exact otherwise.",
                       "scale", kind="choice", choices=lowrank.SVD_METHODS)
    device: str = setting("cpu", "Where the SVDs run; cuda needs PyTorch with CUDA (the `torch` extra).", "scale",
                          kind="choice", choices=("cpu", "cuda"))
    # None: one per available core (up to MAX_DEFAULT_JOBS); never changes the output
    jobs: int | None = setting(None, "Factorize up to N layers at once (threads, within a memory budget); the output "
                               "is identical to --jobs 1. Default: one per available core, up to 8.", "scale",
                               kind="count", metavar="N", show_default=False)

    @classmethod
    def of(cls, **keywords: Any) -> Settings:
        """Settings from keywords, the rank policy as its own keyword (rank_ratio=0.5, param_budget=0.6, ...)."""
        policy = policies.from_keywords(keywords)
        return cls(**keywords) if policy is None else cls(policy=policy, **keywords)

    def __post_init__(self) -> None:
        if self.jobs is None:
            object.__setattr__(self, "jobs", default_jobs())
        if not isinstance(self.policy, RankPolicy):
            raise OnnxlrError(f"{{0}} must be one of onnxlr.policies.POLICIES, got {self.policy!r}", "policy")
        for name in ("ops", "include", "exclude", "methods"):  # any iterable the caller gives, kept as a tuple
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for field in dataclasses.fields(self):
            check_setting(field, getattr(self, field.name))
        if isinstance(self.policy, LatencyBudget) or self.latency_table is not None:
            object.__setattr__(self, "objective", "latency")
        self._check_latency_provider()
        if self.methods is not None and (not self.methods or any(m not in METHODS for m in self.methods)
                                         or "svd" not in self.methods):
            raise OnnxlrError(f"{{0}} must be svd or svd,joint; got {','.join(self.methods) or 'nothing'}", "methods")
        unknown = [op for op in self.ops if op not in RULES and op not in OPT_IN_OPS]
        if unknown:
            raise OnnxlrError(f"unsupported op type(s) {', '.join(unknown)}; choose from "
                              f"{', '.join((*RULES, *OPT_IN_OPS))}")
        if self.quantize_block not in INT4_BLOCKS:
            raise OnnxlrError(f"{{0}} must be one of {', '.join(map(str, INT4_BLOCKS))}, got {self.quantize_block}",
                              "quantize_block")
        self._check_auto()
        if self.correction_rank and self.quantize != "int4":
            raise OnnxlrError("{0} corrects 4-bit quantization error: it needs {1} int4", "correction_rank",
                              "quantize")
        lowrank.check_device(self.solver.device)  # validates svd and device first

    def _check_auto(self) -> None:
        """--quantize auto plans precision against a target or a byte budget, and nothing else does."""
        sized = isinstance(self.policy, policies.SizeBudget)
        if sized and self.quantize != "auto":
            raise OnnxlrError("{0} is the byte budget of {1} auto", "size_budget", "quantize")
        if self.quantize != "auto":
            return
        # its goal (a target or --size-budget) is checked when it runs: the layers' selection runs with a rank ratio
        if self.correction_rank:
            raise OnnxlrError("{0} auto plans each layer's correction rank itself: leave out {1}", "quantize",
                              "correction_rank")
        if self.objective == "latency":
            raise OnnxlrError("{0} auto plans bytes against error; it does not plan measured time yet (leave out {1})",
                              "quantize", "objective")

    def _check_latency_provider(self) -> None:
        from onnxlr.verification.runtime import PROVIDERS

        if self.latency_provider not in PROVIDERS:
            raise OnnxlrError(f"{{0}} must be one of {', '.join(PROVIDERS)}; got {self.latency_provider!r}",
                              "latency_provider")

    @property
    def solver(self) -> lowrank.Solver:
        return lowrank.Solver(svd=self.svd, device=self.device)

    @property
    def budget(self) -> tuple[str, float] | None:
        """The whole-model budget, ("params", "macs" or "latency", fraction kept), when one is the policy."""
        return (self.policy.measure, self.policy.value) if isinstance(self.policy, Budget) else None

    @property
    def budget_setting(self) -> str:
        """The keyword of the budget in force (param_budget, mac_budget or latency_budget)."""
        return self.policy.keyword if isinstance(self.policy, Budget) else "param_budget"

    @property
    def goal(self) -> Goal | None:
        """The end-to-end target (target_cosine / target_error), when one is the policy."""
        return self.policy if isinstance(self.policy, Goal) else None

    def with_budget(self, fraction: float, measure: str = "params") -> Settings:
        """The same settings with a whole-model budget as the policy (a goal's search, a pair's share)."""
        return dataclasses.replace(self, policy=policies.BUDGETS[measure](fraction))

    def as_dict(self) -> dict[str, Any]:
        """Every setting (the report's `settings`), the policy as its keyword (the others None)."""
        flat = {**policies.as_keywords(self.policy)}
        flat.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "policy"})
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()}

    def recorded(self) -> dict[str, Any]:
        """The settings a written model records (metadata `onnxlr.settings`).

        --jobs changes how fast, not what, so it stays out; settings added later stay out while at their
        default, so a run that does not use them writes the same bytes as before they existed."""
        recorded = {k: v for k, v in self.as_dict().items()
                    if k != "jobs" and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
        if self.ops == ALL_OPS:
            recorded["ops"] = [op for op in ALL_OPS if op not in LATER_OPS]
        return recorded


def check_setting(field: dataclasses.Field, value: Any) -> None:
    """A field's declared check (setting(kind=...)); the message names its keyword."""
    kind, name = field.metadata.get("kind", ""), field.name
    if kind == "bool" and not isinstance(value, bool):
        raise OnnxlrError(f"{{0}} must be True or False, got {value!r}", name)
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise OnnxlrError(f"{{0}} must be an integer, got {value!r}", name)
    if kind == "number" and value is not None:
        low, high = field.metadata["bounds"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise OnnxlrError(f"{{0}} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    if kind in ("count", "natural") and value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < (1 if kind == "count" else 0)):
        raise OnnxlrError(f"{{0}} must be a {'positive' if kind == 'count' else 'non-negative'} integer, "
                          f"got {value!r}", name)
    if kind == "choice" and value is not None and value not in field.metadata["choices"]:
        raise OnnxlrError(f"{{0}} must be one of {', '.join(field.metadata['choices'])}; got {value!r}", name)
