"""`optimize --html`: the report dict as one self-contained page.

The page reads the report dict only, the same dict `--report` writes, and each section or plot is
left out when the report lacks its data (a dry run has no verification, a run without
--report/--html/--targets no edge estimates, ...). The shared page pieces are in
`onnxlr.render.html_page`, the plots in `onnxlr.render.html_report_plots`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from onnxlr.render.html_page import BASE_CSS, esc, page, stat
from onnxlr.render.html_report_plots import (
    before_after_plot,
    error_plot,
    latency_plot,
    rank_plot,
    targets_plot,
)
from onnxlr.render.report import agreement_text, output_verdict, similarity, verification_verdict, write_text

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
/* a joint pair: its own row group, bracketed on the left, headed by what the pair keeps */
table.data tbody.pair { border-left: 4px solid #0969da; border-top: 2px solid #0969da; border-bottom: 2px solid #0969da; }
table.data tbody.pair tr.pair-head th { background: #ddf4ff; color: #0550ae; font-weight: 600; vertical-align: middle; }
table.data tbody.pair tr.pair-head th .muted { font-weight: 400; }
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



def _breakable(name: str) -> str:
    """A node name, escaped, that may wrap after '/' and '.' (never inside a word)."""
    return re.sub(r"([/.])", r"\1<wbr>", esc(name))


def _badge(text: str, kind: str) -> str:
    return f"<span class='badge {kind}'>{esc(text)}</span>"


Rows = Iterable[tuple[str, Sequence[str]]]  # (css class, cells already HTML)


def _table(columns: Sequence[tuple[str, bool]], rows: Rows, table_id: str = "",
           foot: Sequence[str] | None = None) -> str:
    """A striped table; columns are (label, numeric); rows are (css class, cells already HTML)."""
    return _grouped_table(columns, [("", "", rows)], table_id, foot)


def _grouped_table(columns: Sequence[tuple[str, bool]], groups: Iterable[tuple[str, str, Rows]],
                   table_id: str = "", foot: Sequence[str] | None = None) -> str:
    """A table of row groups: each (css class, head row already HTML or "", rows) is one <tbody>."""
    numeric = [is_num for _, is_num in columns]
    head = "".join(f"<th class='num'>{esc(label)}</th>" if is_num else f"<th>{esc(label)}</th>"
                   for label, is_num in columns)
    bodies = []
    for group_css, group_head, rows in groups:
        body = "".join(f"<tr class='{css}'>" + _cells(cells, numeric) + "</tr>" for css, cells in rows)
        bodies.append((f"<tbody class='{group_css}'>" if group_css else "<tbody>") + group_head + body + "</tbody>")
    footer = f"<tfoot><tr>{_cells(foot, numeric)}</tr></tfoot>" if foot else ""
    ident = f" id='{table_id}'" if table_id else ""
    return f"<table class='data'{ident}><thead><tr>{head}</tr></thead>{''.join(bodies)}{footer}</table>"


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
    verdict = verification_verdict(report["verification"])
    kind = {"passed": "ok", "FAILED": "bad"}.get(verdict, "warn")
    return _badge(f"verification {verdict}", kind)


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
    stage = report.get("quantization")
    if stage:  # the final model is the quantized one: its bytes beside the low-rank stage's
        rows.insert(2, (f"bytes after --quantize {stage['mode']}", totals.get("bytes_before"), stage.get("bytes_after")))
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
    plan = report.get("latency")
    if plan:  # --objective latency: what the measured plan saves, in isolation
        unknown += (f"<p>Latency plan ({esc(plan['source'])}, {esc(str(plan['provider']))}, {plan['threads']} "
                    f"thread(s)): the {plan['timed_layers']} timed layers take {plan['targets_ms']:.3f} ms, planned "
                    f"{plan['planned_ms']:.3f} ms measured in isolation ({plan['planned_saving']:.1%} saved); "
                    f"{plan['timed_models']} micro-models timed in {plan['timing_s']:.1f} s.</p>")
    stats = "".join([
        stat("layers factorized", f"{totals['factorized']} of {totals['factorized'] + totals['skipped']}"),
        stat("parameters kept", _ratio(totals.get("params_after"), totals.get("params_before"))),
        stat("bytes kept", _ratio(totals.get("bytes_after"), totals.get("bytes_before"))),
        stat(f"bytes kept, {stage['mode']}", _ratio(stage.get("bytes_after"), totals.get("bytes_before")))
        if stage else "",
        stat("MACs kept", _ratio(totals.get("macs_after"), totals.get("macs_before"))),
    ])
    pairs = sum(len(group) == 2 for group in layer_groups(report["layers"]))
    if pairs:  # both layers of a pair count as factorized above; here the pairs themselves
        stats += stat("joint pairs", f"{pairs} ({2 * pairs} layers)")
    return f"<section class='card'><h2>Totals</h2><div class='stats'>{stats}</div>{table}{unknown}</section>"


def _verification(report: dict[str, Any]) -> str:
    result = report.get("verification")
    if not result:
        return ""
    gates = result.get("gates", {})
    named = [f"{key.replace('_', ' ')} {value:g}" for key, value in sorted(gates.items())
             if value is not None and key not in ("min_metrics", "source")]
    named += [f"min {name} {value:g}" for name, value in gates.get("min_metrics") or ()]
    if gates.get("source"):
        named.append(f"from the {gates['source']}")
    gate_text = ", ".join(named) or "none (figures only; NaN/Inf the original lacks always fail)"
    columns = [("provider", False), ("output", False), ("max abs", True), ("mean abs", True), ("max rel", True),
               ("cosine", True), ("sample cosine", True), ("SNR dB", True), ("top-1 / nbr@5", True), ("NaN / Inf", True),
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
        + "".join(_layer_checks(provider, entry.get("layer_checks") or [])
                  for provider, entry in result["providers"].items())
        + (f"<h3>Provider noise (the reference against itself on CPU)</h3><ul>{''.join(noise)}</ul>" if noise else "")
        + _figure("errors", error_plot(result)) + "</section>"
    )


def _layer_checks(provider: str, rows: list[dict[str, Any]]) -> str:
    """The per-layer check (each factorized layer on the original layer's inputs), every layer, worst first."""
    if not rows:
        return ""
    cells = []
    for row in rows:
        if row.get("error"):
            cells.append(("bad", [f"<code>{esc(row['layer'])}</code>", "–", "–", _badge(row["error"], "bad")]))
            continue
        verdict = "–" if not row["gated"] else (_badge("pass", "ok") if row["passed"] else _badge("FAIL", "bad"))
        cells.append(("" if row["passed"] else "bad", [f"<code>{esc(row['layer'])}</code>",
                                                       _num(row["relative_error"], ".4f"), _num(row["cosine"], ".6f"),
                                                       verdict]))
    return (f"<h3>Per-layer check on {esc(provider)} (each layer on the original's inputs, worst first)</h3>"
            + _table([("layer", False), ("rel error", True), ("cosine", True), ("result", False)], cells,
                     f"layer-check-{provider}"))


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
                verdict = {"pass": _badge("pass", "ok"), "not gated": _badge("not gated", "warn")}.get(
                    output_verdict(m), _badge(f"FAIL: {m['failure']}", "bad"))
            bad_values = f"{m.get('nan', 0)} / {m.get('inf', 0)}"
            yield "", [esc(provider), label, _num(m["max_abs"], ".3g"), _num(m["mean_abs"], ".3g"),
                       _num(m["max_rel"], ".3g"), esc(similarity(m)), _num(m.get("mean_sample_cosine"), ".6f"),
                       _num(m.get("snr_db"), ".1f"), esc(agreement_text(m)), bad_values, verdict]


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
    groups, run = [], []  # consecutive single rows share one <tbody>; each joint pair has its own
    for group in layer_groups(layers):
        if len(group) == 1:
            run.append(_layer_row(group[0]))
            continue
        if run:
            groups.append(("", "", run))
            run = []
        groups.append(("pair", _pair_head(group, len(columns)), [_layer_row(layer) for layer in group]))
    if run:
        groups.append(("", "", run))
    foot = ["total", "", "", "", "", "", "", *(_int(_sum(layers, key)) for key in
                                               ("params_before", "params_after", "macs_before", "macs_after")), "", ""]
    legend = ("<p class='muted legend'>Joint pair (bracketed in blue): two layers compressed together from "
              "calibration data, the first one first, its partner right below it. An MLP pair (linear → activation "
              "→ linear) keeps k of its D inner neurons (the first layer's outputs, the second layer's inputs, that "
              "one refitted); an attention pair keeps k of the d dimensions of every head, for the value and output "
              "projections (V·O) or the query and key projections (Q·Kᵀ). Both rows show k / D (k / d). Their "
              "energy kept is 1 - the relative squared output error of the pair's second layer (of the model's "
              "outputs for Q·Kᵀ).</p>"
              if any(len(group) == 2 for group in layer_groups(layers)) else "")
    return ("<section class='card'><h2>Layers</h2><p class='muted'>One row per MatMul/Gemm/Conv node in graph "
            "order; params count the node's weight and bias. Energy kept: fraction of the squared singular values "
            "(of the output energy on the calibration data when the method is whitened).</p>" + legend
            + _grouped_table(columns, groups, "layers", foot if layers else None) + "</section>")


def layer_groups(layers: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The layers in graph order, each joint pair brought together: [up, down] where the up layer stands.

    The up layer reads the input the down layer depends on, so it comes first in graph order; its
    partner moves up beside it. A row naming a partner that does not name it back stays alone."""
    joint: dict[str, dict[str, Any]] = {}
    for layer in layers:
        if layer.get("method") == "joint" and layer.get("partner"):
            joint.setdefault(layer["name"], layer)
    placed: set[int] = set()
    groups = []
    for layer in layers:
        if id(layer) in placed:
            continue
        placed.add(id(layer))
        partner = joint.get(layer.get("partner") or "") if joint.get(layer["name"]) is layer else None
        if partner is not None and partner is not layer and id(partner) not in placed \
                and partner.get("partner") == layer["name"]:
            placed.add(id(partner))
            groups.append([layer, partner])
        else:
            groups.append([layer])
    return groups


def _pair_head(pair: Sequence[dict[str, Any]], width: int) -> str:
    """The row heading a joint pair's group: what it keeps, and its parameters before and after."""
    up = pair[0]
    before, after = _sum(pair, "params_before"), _sum(pair, "params_after")
    params = (f" <span class='muted'>· params {_int(before)} → {_int(after)} ({_ratio(after, before)})</span>"
              if before is not None and after is not None else "")
    kind = up.get("pair_kind") or ""
    what = {"attention-vo": "dimensions of every head (V·O)", "attention-qk": "dimensions of every head (Q·Kᵀ)"}
    return (f"<tr class='pair-head'><th colspan='{width}'>joint pair: keeps {_int(up.get('rank'))} of "
            f"{_int(up.get('full_rank'))} {what.get(kind, 'neurons')}{params}</th></tr>")


def _layer_row(layer: dict[str, Any]) -> tuple[str, list[str]]:
    factorized = layer["status"] == "factorized"
    shape = "x".join(map(str, layer["weight_shape"])) if layer.get("weight_shape") else "–"
    scheme = layer.get("scheme") or "–"
    if factorized and layer.get("method") == "whitened":
        scheme += " · whitened"
    rank = f"{layer['rank']} / {layer['full_rank']}" if factorized else (
        f"– / {layer['full_rank']}" if layer.get("full_rank") else "–")
    note = esc(layer.get("reason") or "")
    if layer.get("partner"):
        note += ("; " if note else "") + f"joint with <code>{_breakable(layer['partner'])}</code>"
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
    groups = layer_groups(report["layers"])
    layers = [layer for group in groups for layer in group]  # the table's order: a joint pair's rows together
    figures = [_figure("params", before_after_plot(layers, "params", "parameters per layer")),
               _figure("macs", before_after_plot(layers, "macs", "MACs per layer")),
               _figure("ranks", rank_plot(layers))]
    figures = [figure for figure in figures if figure]
    if not figures:
        return ""
    joint = (" A joint pair's two layers stand together; their rank is the inner neurons the pair keeps."
             if any(len(group) == 2 for group in groups) else "")
    return ("<section class='card'><h2>Per-layer plots</h2><p class='muted'>Grey: before, blue: after; skipped "
            f"layers keep their size.{joint}</p><div class='plots'>{''.join(figures)}</div></section>")


__all__ = ["render_html", "write_html"]
