"""HTML pages: `optimize --html` (the report dict as one page) and the pieces `analyze --html` shares.

Self-contained means no network reference at all: the CSS is inline and uses the reader's system
fonts, and every plot is a matplotlib figure (Agg backend) inlined as an <svg> element whose text
stays text and whose namespace URLs are dropped. The page reads the report dict only, the same dict
`--report` writes, and each section or plot is left out when the report lacks its data (a dry run
has no verification, a run without --report/--html/--targets no edge estimates, ...).
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from onnxlr.report import human, write_text

# ----------------------------------------------------------------------------- shared page pieces

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f4f5f7;
       color: #1f2328; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.15em; margin: 0 0 8px; }
h3 { font-size: 1em; margin: 12px 0 4px; }
.muted { color: #656d76; font-size: 0.92em; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.stats { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.stat { background: #f6f8fa; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.stat b { display: block; font-size: 1.3em; }
pre { background: #1f2328; color: #f6f8fa; padding: 12px; border-radius: 6px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eaeef2; }
figure { margin: 8px 0 0; } figure svg { width: 100%; height: auto; }
"""


def page(title: str, body: Iterable[str], css: str = BASE_CSS) -> str:
    """A complete HTML document around `body` (parts that are already HTML)."""
    return "\n".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(title)}</title>",
        f"<style>{css}</style></head><body><main>",
        *body,
        "</main></body></html>\n",
    ])


def esc(value: Any) -> str:
    return html.escape(str(value))


def stat(label: str, value: Any) -> str:
    """A headline figure: the value large, its label below."""
    return f"<div class='stat'><b>{esc(value)}</b>{esc(label)}</div>"


def pyplot() -> Any:
    """matplotlib with the file-only Agg backend, imported on first use (only --html needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def svg(figure: Any, salt: str) -> str:
    """The figure as an inline <svg> element with no URLs (namespaces, DOCTYPE and metadata dropped)."""
    import io

    import matplotlib

    plt = pyplot()
    buffer = io.StringIO()
    # Text stays text (page fonts, smaller); a fixed salt gives stable, per-figure unique ids.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"onnxlr-{salt}"}):
        figure.tight_layout()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(figure)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # HTML5 knows the svg and xlink namespaces without declarations, which carry URLs.
    return re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)


# ----------------------------------------------------------------------------- optimize: the page

CSS = BASE_CSS + """
main { max-width: 1320px; }
table.data { width: 100%; }
table.data th, table.data td { padding: 4px 7px; }
table.data th { text-align: left; vertical-align: bottom; }
table.data thead th { position: sticky; top: 0; background: #eef1f4; z-index: 1; box-shadow: 0 1px 0 #d0d7de; }
table.data tbody tr:nth-child(even) { background: #f6f8fa; }
table.data tfoot td { font-weight: 600; border-top: 2px solid #d0d7de; }
table.data .num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr.skipped td { color: #656d76; }
#layers { font-size: 0.85em; }  /* thirteen columns in one screen width */
#layers th, #layers td { padding: 4px 6px; }
#layers td:first-child { min-width: 10em; }  /* node names wrap after '/' or '.' (<wbr>) */
#layers td:last-child { min-width: 11em; }  /* the reason a layer was skipped, in a few lines */
td code { overflow-wrap: break-word; }
.badge { display: inline-block; border-radius: 10px; padding: 1px 9px; font-size: 0.8em; font-weight: 600; }
.ok { background: #dafbe1; color: #1a7f37; } .bad { background: #ffebe9; color: #cf222e; }
.warn { background: #fff8c5; color: #7d4e00; } .info { background: #ddf4ff; color: #0550ae; }
h1 .badge, h2 .badge { vertical-align: middle; margin-left: 8px; }
dl.settings { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 2px 16px;
              margin: 8px 0 0; font-size: 0.9em; }
dl.settings div { display: flex; gap: 8px; } dl.settings dt { color: #656d76; } dl.settings dd { margin: 0; }
.estimate { border-left: 4px solid #bf8700; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 12px 24px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.9em; }
.device { display: block; color: #656d76; font-size: 0.88em; }
"""

BEFORE, AFTER = "#8c959f", "#0969da"  # the same two colors in every before/after plot


def render_html(report: dict[str, Any]) -> str:
    """The optimize report as one self-contained page."""
    title = f"onnxlr optimize: {Path(str(report.get('input', 'model'))).name}"
    sections = [_header(report), _summary(report), _verification(report), _targets(report), _latency(report),
                _calibration(report), _layers(report), _layer_plots(report)]
    return page(title, [section for section in sections if section], CSS)


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """Write the page atomically (like write_json)."""
    return write_text(render_html(report), path)


# ----------------------------------------------------------------------------- formatting


def _int(value: Any) -> str:
    """1234567 -> '1,234,567'; None -> an en dash."""
    if value is None:
        return "–"
    return f"{value:,.0f}" if isinstance(value, float) else f"{value:,}"


def _num(value: Any, spec: str) -> str:
    """A float with a format spec; None -> dash, infinities spelled out (SNR of an exact match)."""
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return format(value, spec)


def _ratio(after: Any, before: Any) -> str:
    return f"{after / before:.1%}" if after is not None and before else "–"


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


def _breakable(name: str) -> str:
    """A node name, escaped, that may wrap after '/' and '.' (never inside a word)."""
    return re.sub(r"([/.])", r"\1<wbr>", esc(name))


def _badge(text: str, kind: str) -> str:
    return f"<span class='badge {kind}'>{esc(text)}</span>"


def _table(columns: Sequence[tuple[str, bool]], rows: Iterable[tuple[str, Sequence[str]]], table_id: str = "",
           foot: Sequence[str] | None = None) -> str:
    """A striped table; columns are (label, numeric); rows are (css class, cells already HTML)."""
    numeric = [is_num for _, is_num in columns]
    head = "".join(f"<th class='num'>{esc(label)}</th>" if is_num else f"<th>{esc(label)}</th>"
                   for label, is_num in columns)
    body = "".join(f"<tr class='{css}'>" + _cells(cells, numeric) + "</tr>" for css, cells in rows)
    footer = f"<tfoot><tr>{_cells(foot, numeric)}</tr></tfoot>" if foot else ""
    ident = f" id='{table_id}'" if table_id else ""
    return f"<table class='data'{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody>{footer}</table>"


def _cells(cells: Sequence[str], numeric: Sequence[bool]) -> str:
    return "".join(f"<td class='num'>{cell}</td>" if is_num else f"<td>{cell}</td>"
                   for cell, is_num in zip(cells, numeric))


def _figure(name: str, svg_text: str | None) -> str:
    """A plot in its figure element; nothing when the plot was skipped for lack of data."""
    return f"<figure class='plot' id='plot-{name}'>{svg_text}</figure>" if svg_text else ""


# ----------------------------------------------------------------------------- sections


def _header(report: dict[str, Any]) -> str:
    source = str(report.get("input", "?"))
    target = report.get("output")
    written = (f"<b>{esc(Path(str(target)).name)}</b> <span class='muted'>({esc(target)})</span>" if target
               else "<i>not written</i>" + (" (verification failed)" if _failed(report) else ""))
    return (
        "<section class='card'>"
        f"<h1>onnxlr optimize{_verdict(report)}</h1>"
        f"<div><b>{esc(Path(source).name)}</b> <span class='muted'>({esc(source)})</span> → {written}</div>"
        f"<div class='muted'>onnxlr {esc(report.get('onnxlr_version', '?'))}</div>"
        f"{_settings(report.get('settings', {}))}</section>"
    )


def _failed(report: dict[str, Any]) -> bool:
    return "verification" in report and not report["verification"]["passed"]


def _verdict(report: dict[str, Any]) -> str:
    if "verification" not in report:
        return _badge("not verified", "info")
    return _badge("verification passed", "ok") if report["verification"]["passed"] else _badge("verification FAILED",
                                                                                             "bad")


def _settings(settings: dict[str, Any]) -> str:
    """The settings that are set (the rest are listed in one muted line, so the policy stands out)."""
    shown, unset = [], []
    for key in sorted(settings):
        value = settings[key]
        if value is None or value == [] or value is False:
            unset.append(key)
            continue
        text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        shown.append(f"<div><dt>{esc(key)}</dt><dd><code>{esc(text)}</code></dd></div>")
    rest = f"<div class='muted'>not set: {esc(', '.join(unset))}</div>" if unset else ""
    return f"<h3>Settings</h3><dl class='settings'>{''.join(shown)}</dl>{rest}"


def _summary(report: dict[str, Any]) -> str:
    totals = report["totals"]
    rows = [("parameters", totals.get("params_before"), totals.get("params_after")),
            ("bytes (constant tensors)", totals.get("bytes_before"), totals.get("bytes_after")),
            ("MatMul/Gemm/Conv MACs", totals.get("macs_before"), totals.get("macs_after"))]
    cost = report.get("cost", {})
    if "after" in cost:
        rows.append(("model FLOPs", cost["before"]["flops"], cost["after"]["flops"]))
    table = _table([("", False), ("before", True), ("after", True), ("after / before", True), ("saved", True)],
                   [("", [esc(label), _int(before), _int(after), _ratio(after, before),
                          _int(before - after) if None not in (before, after) else "–"])
                    for label, before, after in rows])
    unknown = ("<p class='muted'>Some dimensions were unknown to shape inference and counted as 1: MACs and FLOPs "
               "are per unit of those dimensions (give --shape to fix them).</p>"
               if cost.get("before", {}).get("unknown_dims") else "")
    stats = "".join([
        stat("layers factorized", f"{totals['factorized']} of {totals['factorized'] + totals['skipped']}"),
        stat("parameters kept", _ratio(totals.get("params_after"), totals.get("params_before"))),
        stat("bytes kept", _ratio(totals.get("bytes_after"), totals.get("bytes_before"))),
        stat("MACs kept", _ratio(totals.get("macs_after"), totals.get("macs_before"))),
    ])
    return f"<section class='card'><h2>Totals</h2><div class='stats'>{stats}</div>{table}{unknown}</section>"


def _verification(report: dict[str, Any]) -> str:
    result = report.get("verification")
    if not result:
        return ""
    gates = result.get("gates", {})
    gate_text = ", ".join(f"{key.replace('_', ' ')} {value:g}" for key, value in sorted(gates.items())
                          if value is not None) or "none (figures only; NaN/Inf the original lacks always fail)"
    columns = [("provider", False), ("output", False), ("max abs", True), ("mean abs", True), ("max rel", True),
               ("cosine", True), ("sample cosine", True), ("SNR dB", True), ("top-1", True), ("NaN / Inf", True),
               ("result", False)]
    rows = [row for provider, entry in result["providers"].items() for row in _verification_rows(provider, entry)]
    failures = "".join(f"<li>{esc(text)}</li>" for text in result.get("failures", []))
    noise = [f"<li>{esc(provider)} vs cpu, {esc(name)}: max abs {_num(n.get('max_abs'), '.3g')}, cosine "
             f"{_num(n.get('cosine'), '.6f')}</li>"
             for provider, entry in result["providers"].items() for name, n in entry.get("reference_vs_cpu", {}).items()]
    return (
        f"<section class='card'><h2>Verification{_verdict(report)}</h2>"
        f"<div class='muted'>{esc(result.get('samples', '?'))} sample(s); gates: {esc(gate_text)}</div>"
        + (f"<ul class='failures'>{failures}</ul>" if failures else "")
        + _table(columns, rows, "verification")
        + (f"<h3>Provider noise (the reference against itself on CPU)</h3><ul>{''.join(noise)}</ul>" if noise else "")
        + _figure("errors", error_plot(result)) + "</section>"
    )


def _verification_rows(provider: str, entry: dict[str, Any]) -> Iterable[tuple[str, list[str]]]:
    for kind, group in (("", entry["outputs"]), ("layer ", entry.get("layers", {}))):
        for name, m in group.items():
            label = f"{esc(kind)}<code>{esc(name)}</code>"
            if "max_abs" not in m:
                yield "bad", [esc(provider), label, *["–"] * 8, _badge(m.get("failure") or "failed", "bad")]
                continue
            if kind:  # per-layer figures explain, they do not gate
                verdict = "–"
            else:
                verdict = _badge("pass", "ok") if m["passed"] else _badge(f"FAIL: {m['failure']}", "bad")
            bad_values = f"{m.get('nan', 0)} / {m.get('inf', 0)}"
            yield "", [esc(provider), label, _num(m["max_abs"], ".3g"), _num(m["mean_abs"], ".3g"),
                       _num(m["max_rel"], ".3g"), _num(m["cosine"], ".6f"), _num(m.get("mean_sample_cosine"), ".6f"),
                       _num(m.get("snr_db"), ".1f"), _num(m.get("top1_agreement"), ".3f"), bad_values, verdict]


def _targets(report: dict[str, Any]) -> str:
    targets = report.get("targets")
    if not targets:
        return ""
    columns = [("target", False), ("precision", False), ("before ms (est.)", True),
               ("after ms (est.)", True), ("speedup (est.)", True), ("compute / memory-bound nodes after", True)]
    rows = []
    for key, entry in targets.items():
        before, after = entry["before"], entry["after"]
        speedup = entry.get("speedup_estimate")
        device = f"<span class='device'>{esc(entry['name'])}</span>" if entry.get("name") else ""
        rows.append(("", [f"<code>{esc(key)}</code>{device}", esc(after.get("precision", "")),
                          _num(before["estimate_ms"], ".4f"), _num(after["estimate_ms"], ".4f"),
                          f"{speedup:.2f}x" if speedup is not None else "–",
                          f"{after.get('compute_bound_nodes', '–')} / {after.get('memory_bound_nodes', '–')}"]))
    sources = sorted({str(entry.get("source", "")) for entry in targets.values()} - {""})
    return (
        "<section class='card estimate'><h2>Edge latency ESTIMATE " + _badge("estimate, not measured", "warn")
        + "</h2><p class='muted'>Roofline from published (or derived) peak figures: each node costs max(FLOPs / "
        "peak, bytes / bandwidth) + overhead, summed. Real kernels reach a fraction of peak: read the ratio "
        f"before/after more than the milliseconds. Figures and their sources: {esc(', '.join(sources))} "
        "(the JSON report's <code>targets.*.figures</code>).</p>"
        + _table(columns, rows, "targets") + _figure("targets", targets_plot(targets)) + "</section>"
    )


def _latency(report: dict[str, Any]) -> str:
    """Measured latency, when the report carries `bench` figures (the `onnxlr bench --json` layout)."""
    bench = report.get("bench")
    if not bench or not bench.get("providers"):
        return ""
    columns = [("provider", False), ("model", False), ("p50 ms", True), ("p90 ms", True), ("p99 ms", True),
               ("mean ms", True), ("std ms", True), ("runs", True)]
    rows, notes = [], []
    for provider, result in bench["providers"].items():
        for row in result.get("models", []):
            rows.append(("", [esc(provider), esc(Path(str(row["model"])).name), *(
                _num(row.get(key), ".3f") for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")),
                _int(row.get("runs"))]))
        if "speedup" in result:
            s = result["speedup"]
            notes.append(f"<li>{esc(provider)}: speedup {s['median']:.2f}x (p10 {s['p10']:.2f}, p90 {s['p90']:.2f}; "
                         "median of per-run ratios, interleaved runs)</li>")
    return ("<section class='card'><h2>Measured latency</h2>" + _table(columns, rows, "latency")
            + (f"<ul>{''.join(notes)}</ul>" if notes else "") + _figure("latency", latency_plot(bench))
            + "</section>")


def _calibration(report: dict[str, Any]) -> str:
    """Calibration figures: scalars as headline figures, the --target-cosine search as a table."""
    calibration = report.get("calibration")
    if not calibration:
        return ""
    stats = "".join(stat(key.replace("_", " "), value) for key, value in calibration.items()
                    if isinstance(value, (int, float, str, bool)))
    search = calibration.get("search") or []
    table = _table([("budget (fraction of parameters)", True), ("held-out cosine", True)],
                   [("", [_num(step.get("budget"), ".4f"), _num(step.get("cosine"), ".6f")]) for step in search]
                   ) if search else ""
    return (f"<section class='card'><h2>Calibration</h2><div class='stats'>{stats}</div>"
            + (f"<h3>--target-cosine search</h3>{table}" if table else "") + "</section>")


def _layers(report: dict[str, Any]) -> str:
    columns = [("node", False), ("op", False), ("weight", False), ("status", False), ("scheme", False),
               ("rank / full", True), ("break-even", True), ("params before", True), ("params after", True),
               ("MACs before", True), ("MACs after", True), ("energy kept", True), ("reason / note", False)]
    layers = report["layers"]
    rows = [_layer_row(layer) for layer in layers]
    foot = ["total", "", "", "", "", "", "", *(_int(_sum(layers, key)) for key in
                                               ("params_before", "params_after", "macs_before", "macs_after")), "", ""]
    return ("<section class='card'><h2>Layers</h2><p class='muted'>One row per MatMul/Gemm/Conv node in graph "
            "order; params count the node's weight and bias. Energy kept: fraction of the squared singular values "
            "(of the output energy on the calibration data when the method is whitened).</p>"
            + _table(columns, rows, "layers", foot if layers else None) + "</section>")


def _layer_row(layer: dict[str, Any]) -> tuple[str, list[str]]:
    factorized = layer["status"] == "factorized"
    shape = "x".join(map(str, layer["weight_shape"])) if layer.get("weight_shape") else "–"
    scheme = layer.get("scheme") or "–"
    if factorized and layer.get("method") == "whitened":
        scheme += " · whitened"
    rank = f"{layer['rank']} / {layer['full_rank']}" if factorized else (
        f"– / {layer['full_rank']}" if layer.get("full_rank") else "–")
    note = esc(layer.get("reason") or "")
    if layer.get("shared_with"):
        note += ("; " if note else "") + "shared with " + esc(", ".join(layer["shared_with"]))
    energy = _num(layer.get("retained_energy"), ".3f") if factorized else "–"
    status = _badge("factorized", "ok") if factorized else _badge("skipped", "warn")
    cells = [f"<code>{_breakable(layer['name'])}</code>", esc(layer["op_type"]), esc(shape), status, esc(scheme), rank,
             _int(layer.get("break_even_rank")), _int(layer.get("params_before")), _int(layer.get("params_after")),
             _int(layer.get("macs_before")), _int(layer.get("macs_after")), energy, note]
    return ("factorized" if factorized else "skipped"), cells


def _sum(layers: Sequence[dict[str, Any]], key: str) -> int | None:
    """The column's total over the layers that have the figure (a node without a constant weight has none)."""
    values = [layer[key] for layer in layers if layer.get(key) is not None]
    return sum(values) if values else None


def _layer_plots(report: dict[str, Any]) -> str:
    figures = [_figure("params", before_after_plot(report["layers"], "params", "parameters per layer")),
               _figure("macs", before_after_plot(report["layers"], "macs", "MACs per layer")),
               _figure("ranks", rank_plot(report["layers"]))]
    figures = [figure for figure in figures if figure]
    if not figures:
        return ""
    return ("<section class='card'><h2>Per-layer plots</h2><p class='muted'>Grey: before, blue: after; skipped "
            f"layers keep their size.</p><div class='plots'>{''.join(figures)}</div></section>")


# ----------------------------------------------------------------------------- plots


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
        axes.annotate(f"{layer['rank']}/{layer['full_rank']}", (layer["full_rank"], y), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=8)
    labels, title = _layer_labels(rows, "rank per factorized layer")
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    axes.margins(x=0.15)
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


__all__ = ["BASE_CSS", "page", "pyplot", "render_html", "stat", "svg", "write_html"]
