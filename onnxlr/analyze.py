"""`onnxlr analyze`: how compressible each factorizable weight is, before choosing ranks.

Plain data in, plain data out: `analyze_model` takes an onnx-ir model and returns a dict (the
JSON report); `onnxlr.render.report.print_analysis` (terminal) and `onnxlr.render.html_analyze.render_html`
(--html) only present that dict.
Discovery, views (schemes), SVDs and rank planning are those of `onnxlr optimize`
(onnxlr.factorize.targets, onnxlr.factorize.plan), so the numbers here are the ones optimize will use.

Statistics of one view (a (groups, m, n) stack of matrices) are taken on its combined spectrum:
s_i = sqrt(sum over groups of s_gi^2), whose energies are exactly what the rank rules sum.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxlr._version import __version__
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank
from onnxlr.factorize.decisions import Plan
from onnxlr.factorize.groups import WeightGroup
from onnxlr.factorize.plan import plan_ranks
from onnxlr.factorize.svd import SvdCache
from onnxlr.factorize.targets import attach_statistics, find_targets
from onnxlr.model_io.shapes import default_opset, infer_shapes
from onnxlr.passes import Context, Scheme
from onnxlr.passes.base import old_ir
from onnxlr.settings import ALL_OPS, Progress, Settings, no_progress

ENERGY_LEVELS = (0.9, 0.95, 0.99)
DEFAULT_ENERGY = 0.95
# The heavy-tail fit needs enough eigenvalues to say anything; the tail keeps at least this many.
MIN_TAIL = 10
MAX_XMIN_CANDIDATES = 256  # bounds the O(n^2) KS search on wide layers


# ----------------------------------------------------------------------------- statistics of a spectrum


def combined_singular_values(decomposition: lowrank.Decomposition) -> np.ndarray:
    """One descending spectrum for a stack: sqrt of the per-index energy summed over groups (float64)."""
    return np.sqrt(np.sum(decomposition.s.astype(np.float64) ** 2, axis=0))


def effective_rank(s: np.ndarray) -> float:
    """exp(H(p)) with p_i = s_i / sum(s) (Roy & Vetterli 2007): n for a flat spectrum, 1 for rank one, 0 for zero."""
    s = np.asarray(s, dtype=np.float64)
    total = float(np.sum(s))
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(s: np.ndarray) -> float:
    """||W||_F^2 / ||W||_2^2 = sum(s^2) / max(s)^2: a rank that small singular values barely move."""
    s = np.asarray(s, dtype=np.float64)
    top = float(np.max(s)) if s.size else 0.0
    if top <= 0.0:
        return 0.0
    return float(np.sum(s**2) / top**2)


def fit_power_law(values: np.ndarray, min_tail: int = MIN_TAIL) -> dict[str, float] | None:
    """Exponent alpha of a power-law tail p(x) ~ x^-alpha for x >= xmin (Clauset, Shalizi & Newman 2009).

    For each candidate xmin the Hill maximum-likelihood estimate is alpha = 1 + n / sum(ln(x_i / xmin))
    over the n values >= xmin; the xmin kept is the one whose fitted CDF is closest (Kolmogorov-Smirnov
    distance) to the empirical one. Applied to the eigenvalues s^2 of a weight (its empirical spectral
    density), this is WeightWatcher's training-quality signal (Martin & Mahoney): alpha in about 2..6
    is typical of a well-trained layer, alpha < 2 a very heavy tail (strongly correlated, possibly
    over-fit), alpha > 6 a spectrum close to random (little learned structure: often compressible
    only at a high error). None when there are too few distinct positive values.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    x = x[x > 0]
    if x.size < 2 * min_tail:
        return None
    last = x.size - min_tail  # the tail keeps at least min_tail values
    candidates = np.unique(np.linspace(0, last, min(last + 1, MAX_XMIN_CANDIDATES)).astype(int))
    best: dict[str, float] | None = None
    logs = np.log(x)
    for start in candidates:
        xmin = x[start]
        tail_logs = logs[start:] - np.log(xmin)
        spread = float(np.sum(tail_logs))
        if spread <= 0.0:
            continue  # all tail values equal: no slope to fit
        n = x.size - start
        alpha = 1.0 + n / spread
        empirical = np.arange(1, n + 1) / n
        fitted = 1.0 - np.exp((1.0 - alpha) * tail_logs)
        ks = float(np.max(np.abs(empirical - fitted)))
        if best is None or ks < best["ks_distance"]:
            best = {"alpha": float(alpha), "xmin": float(xmin), "tail_size": int(n), "ks_distance": ks}
    return best


def view_statistics(scheme: Scheme, decomposition: lowrank.Decomposition, energy: float,
                    power_law: bool = True) -> dict[str, Any]:
    """Every statistic of one view, and the parameter/MAC savings at the standard energy levels."""
    s = combined_singular_values(decomposition)
    levels = sorted({*ENERGY_LEVELS, energy})
    ranks = {energy_key(level): lowrank.rank_for_energy(decomposition, level) for level in levels}
    savings = {key: _savings(scheme, rank) for key, rank in ranks.items()}
    fit = fit_power_law(decomposition.s.astype(np.float64) ** 2) if power_law else None
    return {
        "scheme": scheme.name,
        "matrix_shape": list(scheme.matrices.shape),
        "method": decomposition.method,
        "full_rank": scheme.full_rank,
        "break_even_rank": scheme.break_even_rank,
        "energy_ranks": ranks,
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "singular_values": s.tolist(),
        "cumulative_energy": decomposition.cumulative_energy().tolist(),
        "savings": savings,
        "power_law": fit,
        "compressible": scheme.gains(ranks[energy_key(energy)]),
    }


def energy_key(level: float) -> str:
    """0.9 -> "0.9", 0.95 -> "0.95" (JSON keys of energy levels)."""
    return f"{level:g}"


def _savings(scheme: Scheme, rank: int) -> dict[str, Any]:
    params, macs = scheme.params_after(rank), scheme.macs_after(rank)
    return {
        "rank": rank,
        "params_after": params,
        "macs_after": macs,
        "param_saving": 1.0 - params / scheme.params_before if scheme.params_before else 0.0,
        "mac_saving": 1.0 - macs / scheme.macs_before if scheme.macs_before else 0.0,
        "gains": scheme.gains(rank),
    }


# ----------------------------------------------------------------------------- the model


def analyze_model(model: ir.Model, model_path: str = "MODEL", energy: float | None = None,
                  param_budget: float | None = None, statistics: Mapping[str, np.ndarray] | None = None,
                  calibration_path: str | None = None, power_law: bool = True,
                  progress: Progress | None = None, ops: Sequence[str] | None = None) -> dict[str, Any]:
    """Analyze every factorizable weight of `model` (not modified) and plan ranks as optimize would.

    The plan uses `--energy` (default 0.95) or `--param-budget`; `statistics` (Grams from
    onnxlr.calibrate.calibration.collect_grams, read from `calibration_path`) whiten the MatMul/Gemm spectra.
    """
    if energy is not None and param_budget is not None:
        raise OnnxlrError("choose {0} or {1}, not both", "energy", "param_budget")
    policy = {"param_budget": param_budget} if param_budget is not None else {"energy": energy or DEFAULT_ENERGY}
    # Discovery as optimize's defaults (or `ops`, e.g. with Gather for embedding tables); validates the fractions.
    settings = Settings.of(**policy, **({"ops": tuple(ops)} if ops else {}))
    level = energy or DEFAULT_ENERGY  # "compressible" is judged at this energy (also under a budget)
    progress = progress or no_progress
    context = Context(shapes=infer_shapes(model), opset=default_opset(model), inputs_as_constants=old_ir(model))
    groups, skipped = find_targets(model, settings, context)
    plan = Plan(groups, SvdCache(settings.solver, attach_statistics(groups, statistics) if statistics else None))
    plan_ranks(plan, groups, settings, progress)  # optimize's own planner: the recommendation is what it does
    layers = [_layer(group, plan, level, power_law) for group in progress(groups, "spectra")]
    skipped_rows = [{"name": item.node.name or "?", "op_type": item.node.op_type, "reason": item.reason}
                    for item in skipped]
    result = {
        "onnxlr_version": __version__,
        "model": str(model_path),
        "energy": level,
        "param_budget": param_budget,
        "calibration": calibration_path,
        "layers": layers,
        "skipped": skipped_rows,
    }
    result["summary"] = _summary(layers, level)
    result["recommendation"] = _recommendation(layers, model_path, policy, calibration_path,
                                               None if settings.ops == ALL_OPS else settings.ops)
    return result


def _layer(group: WeightGroup, plan: Plan, energy: float, power_law: bool) -> dict[str, Any]:
    lead = group.lead
    decision = plan[group]
    views = [view_statistics(s, plan.svd.decomposition(group, s), energy, power_law) for s in group.schemes]
    best = _best_view(views, energy)
    rank = decision.rank
    planned = rank is not None and not decision.reason
    scheme = decision.scheme if planned else None  # planned: set with the rank
    reference = group.schemes[0]
    layer = {
        "name": lead.name,
        "op_type": lead.node.op_type,
        "weight": lead.weight.name,
        "weight_shape": list(lead.array.shape),
        "dtype": lead.dtype.name,
        "shared_with": [t.name for t in group.targets[1:]],
        "params_before": reference.params_before,
        "macs_before": reference.macs_before,
        "views": views,
        "recommended": {
            "dense": not planned,
            "reason": decision.reason,
            "scheme": scheme.name if scheme else None,
            "rank": rank if planned else None,
            "params_after": scheme.params_after(rank) if scheme and rank is not None else reference.params_before,
            "macs_after": scheme.macs_after(rank) if scheme and rank is not None else reference.macs_before,
        },
    }
    # The headline figures are those of the view with the most room below break-even.
    for key in ("scheme", "method", "full_rank", "break_even_rank", "energy_ranks", "effective_rank",
                "stable_rank", "singular_values", "power_law"):
        layer[key] = best[key]
    layer["compressible"] = any(v["compressible"] for v in views)
    return layer


def _best_view(views: list[dict[str, Any]], energy: float) -> dict[str, Any]:
    return min(views, key=lambda v: v["energy_ranks"][energy_key(energy)] / v["break_even_rank"])


def _summary(layers: list[dict[str, Any]], energy: float) -> dict[str, Any]:
    params_before = sum(layer["params_before"] for layer in layers)
    macs_before = sum(layer["macs_before"] for layer in layers)
    params_after = sum(layer["recommended"]["params_after"] for layer in layers)
    macs_after = sum(layer["recommended"]["macs_after"] for layer in layers)
    return {
        "layers": len(layers),
        "compressible": sum(layer["compressible"] for layer in layers),
        "factorized_by_recommendation": sum(not layer["recommended"]["dense"] for layer in layers),
        "energy": energy,
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "param_ratio": params_after / params_before if params_before else 1.0,
        "mac_ratio": macs_after / macs_before if macs_before else 1.0,
    }


def _recommendation(layers: list[dict[str, Any]], model_path: str, policy: dict[str, float],
                    calibration_path: str | None, ops: Sequence[str] | None = None) -> dict[str, Any]:
    dense = [layer for layer in layers if layer["recommended"]["dense"]]
    output = str(Path(model_path).with_name(Path(model_path).stem + "-lr.onnx"))
    command = ["onnxlr", "optimize", str(model_path), output]
    if "energy" in policy:
        command += ["--energy", f"{policy['energy']:g}"]
        # optimize would leave these dense anyway (break-even guard); naming them says so up front.
        for layer in dense:
            for name in [layer["name"], *layer["shared_with"]]:
                command += ["--exclude", _glob_escape(name)]
    else:
        # Under a budget the dense layers are part of the allocation: excluding them would change it.
        command += ["--param-budget", f"{policy['param_budget']:g}"]
    if calibration_path:
        command += ["--calibration", str(calibration_path)]
    if ops:
        command += ["--ops", ",".join(ops)]
    return {
        "command": shlex.join(command),
        "argv": command,
        "ranks": {layer["name"]: layer["recommended"]["rank"] for layer in layers},
        "dense": [layer["name"] for layer in dense],
    }


def _glob_escape(name: str) -> str:
    """A glob (fnmatch, as --exclude uses) matching exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


__all__ = ["analyze_model", "effective_rank", "fit_power_law", "stable_rank", "view_statistics"]
