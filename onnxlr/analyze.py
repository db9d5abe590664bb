"""`onnxlr analyze`: how compressible each factorizable weight is, before choosing ranks.

Plain data in, plain data out: `analyze_model` takes an onnx-ir model and returns a dict (the
JSON report); `analysis_table`, `recommended_command` and `render_html` only present that dict.
Discovery, views (schemes), SVDs and rank planning are those of `onnxlr optimize`
(onnxlr.factorize), so the numbers here are the ones optimize will use.

Statistics of one view (a (groups, m, n) stack of matrices) are taken on its combined spectrum:
s_i = sqrt(sum over groups of s_gi^2), whose energies are exactly what the rank rules sum.
"""

from __future__ import annotations

import html
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from rich.table import Table

from onnxlr import lowrank
from onnxlr._version import __version__
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import (
    Progress,
    Settings,
    WeightGroup,
    attach_statistics,
    find_targets,
    infer_shapes,
    plan_ranks,
)
from onnxlr.html_report import BASE_CSS, page, pyplot, stat, svg
from onnxlr.passes import Context, Scheme

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
    ranks = {_key(level): lowrank.rank_for_energy(decomposition, level) for level in levels}
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
        "compressible": scheme.gains(ranks[_key(energy)]),
    }


def _key(level: float) -> str:
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
                  progress: Progress | None = None) -> dict[str, Any]:
    """Analyze every factorizable weight of `model` (not modified) and plan ranks as optimize would.

    The plan uses `--energy` (default 0.95) or `--param-budget`; `statistics` (Grams from
    onnxlr.calibration.collect_grams, read from `calibration_path`) whiten the MatMul/Gemm spectra.
    """
    if energy is not None and param_budget is not None:
        raise OnnxlrError("choose --energy or --param-budget, not both")
    policy = {"param_budget": param_budget} if param_budget is not None else {"energy": energy or DEFAULT_ENERGY}
    settings = Settings(**policy)  # discovery as optimize's defaults; validates the fractions
    level = energy or DEFAULT_ENERGY  # "compressible" is judged at this energy (also under a budget)
    progress = progress or (lambda items, _description: items)
    opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
    groups, skipped = find_targets(model, settings, Context(shapes=infer_shapes(model), opset=opset))
    if statistics:
        attach_statistics(groups, statistics)
    plan_ranks(groups, settings, progress)  # optimize's own planner: the recommendation is what it does
    layers = [_layer(group, level, power_law) for group in progress(groups, "spectra")]
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
    result["recommendation"] = _recommendation(layers, model_path, policy, calibration_path)
    return result


def _layer(group: WeightGroup, energy: float, power_law: bool) -> dict[str, Any]:
    lead = group.lead
    views = [view_statistics(s, group.decomposition(s), energy, power_law) for s in group.schemes]
    best = _best_view(views, energy)
    planned = group.rank is not None and not group.reason
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
            "reason": group.reason,
            "scheme": group.scheme.name if planned else None,
            "rank": group.rank if planned else None,
            "params_after": group.scheme.params_after(group.rank) if planned else reference.params_before,
            "macs_after": group.scheme.macs_after(group.rank) if planned else reference.macs_before,
        },
    }
    # The headline figures are those of the view with the most room below break-even.
    for key in ("scheme", "method", "full_rank", "break_even_rank", "energy_ranks", "effective_rank",
                "stable_rank", "singular_values", "power_law"):
        layer[key] = best[key]
    layer["compressible"] = any(v["compressible"] for v in views)
    return layer


def _best_view(views: list[dict[str, Any]], energy: float) -> dict[str, Any]:
    return min(views, key=lambda v: v["energy_ranks"][_key(energy)] / v["break_even_rank"])


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
                    calibration_path: str | None) -> dict[str, Any]:
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
    return {
        "command": shlex.join(command),
        "argv": command,
        "ranks": {layer["name"]: layer["recommended"]["rank"] for layer in layers},
        "dense": [layer["name"] for layer in dense],
    }


def _glob_escape(name: str) -> str:
    """A glob (fnmatch, as --exclude uses) matching exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# ----------------------------------------------------------------------------- terminal


def analysis_table(result: dict[str, Any]) -> Table:
    energy = _key(result["energy"])
    title = "onnxlr analyze: spectra of the factorizable weights" + (
        " (whitened by calibration data)" if result["calibration"] else "")
    table = Table(title=title, title_justify="left")
    columns = ["layer", "op", "shape", "scheme", "full", "r90", "r95", "r99", "eff. rank", "stable rank",
               "break-even", "alpha", f"compressible @{energy}"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "op", "shape", "scheme") else "right",
                         overflow="fold")
    for layer in result["layers"]:
        for index, view in enumerate(layer["views"]):
            first = index == 0
            ranks = view["energy_ranks"]
            fit = view["power_law"]
            table.add_row(
                layer["name"] if first else "", layer["op_type"] if first else "",
                "x".join(map(str, layer["weight_shape"])) if first else "", view["scheme"],
                str(view["full_rank"]), str(ranks["0.9"]), str(ranks["0.95"]), str(ranks["0.99"]),
                f"{view['effective_rank']:.1f}", f"{view['stable_rank']:.2f}", str(view["break_even_rank"]),
                f"{fit['alpha']:.2f}" if fit else "-",
                "[green]yes[/]" if view["compressible"] else "[yellow]no[/]",
            )
    return table


def summary_lines(result: dict[str, Any]) -> list[str]:
    from onnxlr.report import human

    summary = result["summary"]
    policy = f"--param-budget {result['param_budget']:g}" if result["param_budget"] else f"--energy {result['energy']:g}"
    lines = [
        f"layers: {summary['layers']}, compressible at energy {result['energy']:g}: {summary['compressible']}",
        f"with {policy}: {summary['factorized_by_recommendation']} factorized, parameters "
        f"{human(summary['params_before'])} -> {human(summary['params_after'])} ({summary['param_ratio']:.1%}), "
        f"MACs {human(summary['macs_before'])} -> {human(summary['macs_after'])} ({summary['mac_ratio']:.1%})",
    ]
    if result["skipped"]:
        lines.append(f"not analyzed: {len(result['skipped'])} node(s) (see --json for the reasons)")
    return lines


def print_analysis(result: dict[str, Any], console: Any) -> None:
    console.print(analysis_table(result))
    for line in summary_lines(result):
        console.print(line)
    console.print("recommended:")
    console.print(result["recommendation"]["command"], markup=False, soft_wrap=True)


# ----------------------------------------------------------------------------- HTML

# The shared page style, plus what only this page has: right-aligned figures, verdict colors, badges.
CSS = BASE_CSS + """
th, td { text-align: right; }
th:first-child, td:first-child { text-align: left; }
.yes { color: #1a7f37; font-weight: 600; } .no { color: #9a6700; font-weight: 600; }
.badge { display: inline-block; border-radius: 10px; padding: 1px 9px; font-size: 0.8em; margin-left: 8px; }
.badge.yes { background: #dafbe1; } .badge.no { background: #fff8c5; }
"""

HELP_TEXT = (
    "<b>Spectrum</b>: singular values by index, log scale, each normalized by the largest; a fast drop "
    "means a low rank keeps most of the weight. <b>Energy</b>: fraction of the squared singular values "
    "kept at each rank; dotted lines mark 90/95/99%, the dashed line of the same color the break-even "
    "rank, past which the factor pair is no smaller or no cheaper than the original. A layer is "
    "compressible when the rank for the analysis energy is left of its break-even line."
)


def render_html(result: dict[str, Any]) -> str:
    """One self-contained page: summary, an overview plot and one card per layer (inline SVG, no links)."""
    summary = result["summary"]
    energy = _key(result["energy"])
    parts = [
        f"<h1>onnxlr analyze: {html.escape(result['model'])}</h1>",
        f"<div class='muted'>onnxlr {html.escape(result['onnxlr_version'])}; spectra "
        f"{'whitened by calibration data ' + html.escape(str(result['calibration'])) if result['calibration'] else 'of the weights (no calibration data)'}</div>",
        "<section class='card'><h2>Summary</h2><div class='stats'>",
        stat("layers", summary["layers"]),
        stat(f"compressible at {energy}", summary["compressible"]),
        stat("factorized by the plan", summary["factorized_by_recommendation"]),
        stat("parameters kept", f"{summary['param_ratio']:.1%}"),
        stat("MACs kept", f"{summary['mac_ratio']:.1%}"),
        "</div><div>Recommended command:</div>",
        f"<pre>{html.escape(result['recommendation']['command'])}</pre>",
        f"<figure class='overview-figure'>{overview_svg(result)}</figure>",
        f"<p class='muted'>{HELP_TEXT}</p></section>",
    ]
    for index, layer in enumerate(result["layers"]):
        parts.append(_layer_card(layer, energy, index))
    if result["skipped"]:
        rows = "".join(f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(s['op_type'])}</td>"
                       f"<td style='text-align:left'>{html.escape(s['reason'])}</td></tr>" for s in result["skipped"])
        parts.append(f"<section class='card'><h2>Not analyzed</h2><table><tr><th>node</th><th>op</th>"
                     f"<th style='text-align:left'>reason</th></tr>{rows}</table></section>")
    return page(f"onnxlr analyze: {Path(result['model']).name}", parts, CSS)


def _layer_card(layer: dict[str, Any], energy: str, index: int) -> str:
    compressible = layer["compressible"]
    badge = f"<span class='badge {'yes' if compressible else 'no'}'>{'compressible' if compressible else 'keep dense'}</span>"
    recommended = layer["recommended"]
    plan = (f"plan: {recommended['scheme']} rank {recommended['rank']}" if not recommended["dense"]
            else f"plan: dense ({html.escape(recommended['reason'])})")
    rows = []
    for view in layer["views"]:
        ranks, fit = view["energy_ranks"], view["power_law"]
        alpha = f"{fit['alpha']:.2f}" if fit else "-"
        verdict = "yes" if view["compressible"] else "no"
        rows.append(
            f"<tr><td>{view['scheme']}</td><td>{view['full_rank']}</td><td>{ranks['0.9']}</td><td>{ranks['0.95']}</td>"
            f"<td>{ranks['0.99']}</td><td>{view['effective_rank']:.1f}</td><td>{view['stable_rank']:.2f}</td>"
            f"<td>{view['break_even_rank']}</td><td>{view['savings'][energy]['param_saving']:.1%}</td>"
            f"<td>{alpha}</td><td class='{verdict}'>{verdict}</td></tr>")
    shared = f"; shared with {html.escape(', '.join(layer['shared_with']))}" if layer["shared_with"] else ""
    return (
        f"<section class='card layer'><h2>{html.escape(layer['name'])}{badge}</h2>"
        f"<div class='muted'>{layer['op_type']} weight {html.escape(str(layer['weight']))} "
        f"{'x'.join(map(str, layer['weight_shape']))}{shared}; {plan}</div>"
        "<table><tr><th>view</th><th>full rank</th><th>r90</th><th>r95</th><th>r99</th><th>effective rank</th>"
        f"<th>stable rank</th><th>break-even</th><th>params saved @{energy}</th><th>alpha</th>"
        f"<th>compressible</th></tr>{''.join(rows)}</table>"
        f"<figure class='layer-figure'>{layer_svg(layer, index)}</figure></section>"
    )


def layer_svg(layer: dict[str, Any], index: int) -> str:
    plt = pyplot()
    figure, (spectrum, energy) = plt.subplots(1, 2, figsize=(10, 3.2))
    for color, view in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], layer["views"]):
        s = np.asarray(view["singular_values"])
        ranks = np.arange(1, s.size + 1)
        top = s[0] if s.size and s[0] > 0 else 1.0
        marker = "o" if s.size <= 16 else None  # a short spectrum (one value, say) is still visible
        spectrum.semilogy(ranks, np.maximum(s / top, 1e-12), color=color, marker=marker, markersize=4,
                          label=view["scheme"])
        energy.plot(ranks, view["cumulative_energy"], color=color, marker=marker, markersize=4, label=view["scheme"])
        if view["break_even_rank"] <= view["full_rank"]:
            energy.axvline(view["break_even_rank"], color=color, linestyle="--", linewidth=1)
    for level in ENERGY_LEVELS:
        energy.axhline(level, color="#888", linestyle=":", linewidth=0.8)
    spectrum.set(title="spectrum (s / s_max)", xlabel="index", ylabel="singular value")
    energy.set(title="energy kept", xlabel="rank", ylabel="fraction of sum s^2", ylim=(0, 1.02))
    if len(layer["views"]) > 1:
        energy.legend(loc="lower right", fontsize="small")
    return svg(figure, f"layer{index}")


def overview_svg(result: dict[str, Any]) -> str:
    """Per layer: r(E) / full rank of the headline view (bar) against its break-even / full rank (tick)."""
    plt = pyplot()
    layers = result["layers"]
    energy = _key(result["energy"])
    names = [layer["name"] for layer in layers]
    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.32 * max(len(layers), 1)))
    positions = np.arange(len(layers))
    ratios = [layer["energy_ranks"][energy] / layer["full_rank"] for layer in layers]
    even = [min(layer["break_even_rank"], layer["full_rank"] + 1) / layer["full_rank"] for layer in layers]
    colors = ["#2da44e" if layer["compressible"] else "#bf8700" for layer in layers]
    axes.barh(positions, ratios, color=colors, height=0.6)
    axes.scatter(even, positions, marker="|", s=300, color="#1f2328", label="break-even / full rank", zorder=3)
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set(xlim=(0, 1.1), xlabel=f"rank keeping {float(energy):.0%} energy / full rank",
             title="compressible layers (green): bar left of the break-even tick")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: never over a bar
    return svg(figure, "overview")


def write_html(result: dict[str, Any], path: str) -> Path:
    from onnxlr.report import write_text

    return write_text(render_html(result), path)


__all__ = ["analyze_model", "analysis_table", "effective_rank", "fit_power_law", "print_analysis", "render_html",
           "stable_rank", "view_statistics", "write_html"]
