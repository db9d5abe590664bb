"""`analyze --html`: the analysis dict (`onnxlr.analyze.analyze_model`) as one self-contained page.

A summary with the recommended command, an overview plot, then one card per layer with its views'
statistics and its spectrum and energy plots. The shared page pieces are in `onnxlr.render.html_page`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from onnxlr.analyze import ENERGY_LEVELS, energy_key
from onnxlr.render.html_page import BASE_CSS, page, pyplot, stat, svg
from onnxlr.render.report import write_text

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
    energy = energy_key(result["energy"])
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
    energy = energy_key(result["energy"])
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
    return write_text(render_html(result), path)


__all__ = ["layer_svg", "overview_svg", "render_html", "write_html"]
