"""The plots of the optimize page (`onnxlr.render.html_report`): matplotlib figures as inline SVG.

Each plot reads its part of the report dict and returns None when that part lacks the data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxlr.render.html_page import pyplot, svg
from onnxlr.render.report import human

BEFORE, AFTER = "#8c959f", "#0969da"  # the same two colors in every before/after plot


def _short(name: str, limit: int = 34) -> str:
    """Long names cut in the middle, so a plot keeps room for its bars."""
    return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2 - 1):]


def _layer_labels(layers: Sequence[dict[str, Any]], title: str) -> tuple[list[str], str]:
    """Y labels and title: the folder every node name shares is said once in the title, not on each row.

    Transformer names differ in the middle (/bert/encoder/layer.3/attention/...): without the shared
    prefix, a middle cut keeps both the layer index and the op."""
    names = [layer["name"] for layer in layers]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind("/") + 1]
    if len(prefix) <= 1:
        return [_short(name) for name in names], title
    return [_short(name[len(prefix):] or name, 30) for name in names], f"{title} (in {_short(prefix, 30)})"


def _height(rows: int) -> float:
    """Figure height (inches) for horizontal bars: a fixed margin plus a fixed height per row."""
    return 1.3 + 0.32 * rows


def _human_axis(axes: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: human(value)))


def _legend(axes: Any) -> None:
    # Outside, right of the axes: never over a bar or a point (tight_layout makes room for it).
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False, scatterpoints=1)


def _style(axes: Any, title: str, xlabel: str) -> None:
    axes.set_title(title, loc="left", fontsize=11)
    axes.set_xlabel(xlabel)
    axes.grid(axis="x", color="#eaeef2")
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def before_after_plot(layers: Sequence[dict[str, Any]], key: str, title: str) -> str | None:
    """Horizontal bars per layer, before and after; factorized layers annotated with after / before."""
    rows = [layer for layer in layers if layer.get(f"{key}_before") is not None]
    if not any(layer[f"{key}_before"] for layer in rows):  # nothing to compare (no layers, or all zero)
        return None
    import numpy as np

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5.6, _height(len(rows))))
    positions = np.arange(len(rows))
    before = [layer[f"{key}_before"] for layer in rows]
    after = [layer.get(f"{key}_after") or layer[f"{key}_before"] for layer in rows]
    axes.barh(positions - 0.2, before, height=0.4, color=BEFORE, label="before")
    axes.barh(positions + 0.2, after, height=0.4, color=AFTER, label="after")
    for y, layer, value, original in zip(positions, rows, after, before):
        if layer["status"] == "factorized" and original:
            axes.annotate(f"{value / original:.0%}", (value, y + 0.2), xytext=(3, 0), textcoords="offset points",
                          va="center", fontsize=8, color="#1f2328")
    labels, title = _layer_labels(rows, title)
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    axes.margins(x=0.12)  # room for the percentages
    _human_axis(axes)
    _style(axes, title, {"params": "parameters", "macs": "MACs"}[key])
    _legend(axes)
    return svg(figure, key)


def rank_plot(layers: Sequence[dict[str, Any]]) -> str | None:
    """Rank against full rank for the factorized layers, break-even as a tick."""
    rows = [layer for layer in layers if layer["status"] == "factorized" and layer.get("rank") and layer.get("full_rank")]
    if not rows:
        return None
    import numpy as np

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5.6, _height(len(rows))))
    positions = np.arange(len(rows))
    axes.barh(positions, [layer["full_rank"] for layer in rows], height=0.6, color="#d0d7de", label="full rank")
    axes.barh(positions, [layer["rank"] for layer in rows], height=0.6, color=AFTER, label="rank")
    even = [(y, layer["break_even_rank"]) for y, layer in zip(positions, rows) if layer.get("break_even_rank")]
    if even:
        axes.scatter([value for _, value in even], [y for y, _ in even], marker="|", s=260, color="#1f2328",
                     label="break-even", zorder=3)
    for y, layer in zip(positions, rows):
        joint = " neurons (joint)" if layer.get("method") == "joint" else ""  # a pair's kept inner neurons
        axes.annotate(f"{layer['rank']}/{layer['full_rank']}{joint}", (layer["full_rank"], y), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=8)
    labels, title = _layer_labels(rows, "rank per factorized layer")
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    axes.margins(x=0.3 if any(layer.get("method") == "joint" for layer in rows) else 0.15)
    _style(axes, title, "rank (of the scheme's matrix view)")
    _legend(axes)
    return svg(figure, "ranks")


def error_plot(verification: dict[str, Any]) -> str | None:
    """Per output and provider: 1 - cosine and the absolute errors, log scale (lower is better), gates dashed."""
    points = [(f"{provider}: {name}", m) for provider, entry in verification["providers"].items()
              for name, m in entry["outputs"].items() if "max_abs" in m]
    if not points:
        return None
    plt = pyplot()
    gates = verification.get("gates", {})
    figure, (cosine, absolute) = plt.subplots(1, 2, figsize=(11, _height(len(points))), sharey=True)
    positions = list(range(len(points)))
    _dots(cosine, [1.0 - m["cosine"] for _, m in points], positions, AFTER, "1 - cosine")
    if gates.get("min_cosine") is not None:
        cosine.axvline(max(1.0 - gates["min_cosine"], TINY), color="#cf222e", linestyle="--", linewidth=1,
                       label=f"gate: cosine {gates['min_cosine']:g}")
    _dots(absolute, [m["max_abs"] for _, m in points], positions, "#cf222e", "max abs")
    _dots(absolute, [m["mean_abs"] for _, m in points], positions, AFTER, "mean abs")
    if gates.get("atol") is not None:
        absolute.axvline(max(gates["atol"], TINY), color="#cf222e", linestyle="--", linewidth=1, label="gate: atol")
    cosine.set_yticks(positions, [_short(label, 40) for label, _ in points])
    cosine.set_ylim(len(points) - 0.5, -0.5)
    _style(cosine, "1 - cosine per output (lower is better)", "1 - cosine (log)")
    _style(absolute, "absolute error per output", "|candidate - reference| (log)")
    for axes in (cosine, absolute):
        _log_axis(axes)
        _legend(axes)
    return svg(figure, "errors")


TINY = 1e-12  # an exact match has zero error: drawn at the floor of a log axis


def _dots(axes: Any, values: Sequence[float], positions: Sequence[int], color: str, label: str) -> None:
    """Points with their values written beside them (a log axis is hard to read off precisely)."""
    shown = [max(value, TINY) for value in values]
    axes.scatter(shown, positions, color=color, label=label, zorder=3)
    for value, y in zip(shown, positions):
        axes.annotate(f"{value:.3g}", (value, y), xytext=(0, 7), textcoords="offset points", ha="center",
                      fontsize=8, color=color)


def _log_axis(axes: Any) -> None:
    """Log x with plain tick labels (0.01, not 10^-2) and room around the points."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.margins(x=0.3, y=0.25)


def targets_plot(targets: dict[str, dict[str, Any]]) -> str | None:
    """Per edge target: the estimate before and after (log ms), joined by a line, speedup written beside."""
    rows = [(key, entry) for key, entry in targets.items() if "before" in entry and "after" in entry]
    if not rows:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(11, _height(len(rows))))
    for y, (_, entry) in enumerate(rows):
        before, after = entry["before"]["estimate_ms"], entry["after"]["estimate_ms"]
        axes.plot([before, after], [y, y], color="#d0d7de", linewidth=3, zorder=1)
        speedup = entry.get("speedup_estimate")
        if speedup is not None:
            axes.annotate(f"{speedup:.2f}x est.", (max(before, after), y), xytext=(8, 0), textcoords="offset points",
                          va="center", fontsize=8)
    axes.scatter([entry["before"]["estimate_ms"] for _, entry in rows], range(len(rows)), color=BEFORE, s=40,
                 label="before", zorder=3)
    axes.scatter([entry["after"]["estimate_ms"] for _, entry in rows], range(len(rows)), color=AFTER, s=40,
                 label="after", zorder=3)
    _log_axis(axes)
    axes.set_yticks(range(len(rows)), [key for key, _ in rows])
    axes.set_ylim(len(rows) - 0.5, -0.5)
    _style(axes, "edge latency ESTIMATE per target (roofline, not measured)", "estimated ms per run (log)")
    _legend(axes)
    return svg(figure, "targets")


def latency_plot(bench: dict[str, Any]) -> str | None:
    """Measured p50 per provider and model, whiskers to p90."""
    # Color by position within a provider: bench lists MODEL first, then --compare OTHER.
    rows = [(f"{provider}: {_short(Path(str(row['model'])).name, 30)}", row, BEFORE if index == 0 else AFTER)
            for provider, result in bench["providers"].items() for index, row in enumerate(result.get("models", []))
            if row.get("p50_ms") is not None]
    if not rows:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(11, _height(len(rows))))
    p50 = [row["p50_ms"] for _, row, _ in rows]
    upper = [max(row.get("p90_ms", row["p50_ms"]) - row["p50_ms"], 0.0) for _, row, _ in rows]
    axes.barh(range(len(rows)), p50, xerr=[[0.0] * len(rows), upper], height=0.6,
              color=[color for _, _, color in rows], capsize=3)
    axes.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    axes.invert_yaxis()
    _style(axes, "measured latency: p50, whisker to p90", "ms per run")
    return svg(figure, "latency")



__all__ = ["before_after_plot", "error_plot", "latency_plot", "rank_plot", "targets_plot"]
