"""Render the report dict (the single source of truth) as a terminal table, and write it as JSON.

Also the terminal tables of `onnxlr analyze` (its analysis dict) and of the edge latency estimates
(`onnxlr.timing.edge`), which optimize and bench print.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console
from rich.table import Table

from onnxlr.analyze import energy_key
from onnxlr.timing.edge import BUILTIN

if TYPE_CHECKING:
    from rich.console import JustifyMethod


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write JSON atomically (temporary file next to the target, then rename)."""
    return write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


def human(count: int | float | None) -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if count is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}" if isinstance(count, (int, float)) else str(count)


def layer_table(report: dict[str, Any]) -> Table:
    table = Table(title="onnxlr: per-layer plan", title_justify="left", show_lines=False)
    for column, justify in (("node", "left"), ("op", "left"), ("weight", "left"), ("scheme", "left"),
                            ("rank", "right"), ("params", "right"), ("MACs", "right"), ("energy", "right"),
                            ("status", "left")):
        table.add_column(column, justify=cast("JustifyMethod", justify), overflow="fold")
    for layer in report["layers"]:
        factorized = layer["status"] == "factorized"
        shape = "x".join(str(d) for d in layer["weight_shape"]) if layer["weight_shape"] else "-"
        rank = f"{layer['rank']}/{layer['full_rank']}" if factorized else "-"
        params = _before_after(layer["params_before"], layer["params_after"], factorized)
        macs = _before_after(layer["macs_before"], layer["macs_after"], factorized)
        energy = f"{layer['retained_energy']:.3f}" if layer["retained_energy"] is not None else "-"
        status = "[green]factorized[/]" if factorized else f"[yellow]skipped[/]: {layer['reason']}"
        if layer.get("partner"):
            status = f"[green]joint[/] with {layer['partner']}"
        table.add_row(layer["name"], layer["op_type"], shape, layer["scheme"] or "-", rank, params, macs,
                      energy, status)
    return table


def _before_after(before: int | None, after: int | None, changed: bool) -> str:
    if before is None:
        return "-"
    return f"{human(before)} -> {human(after)}" if changed else human(before)


def _folder_lines(folder: dict[str, Any] | None) -> list[str]:
    """What an exported model folder gave the run (onnxlr.model_io.folders)."""
    if not folder:
        return []
    limit = f", sequences up to {folder['max_length']} tokens" if folder.get("max_length") else ""
    tokenizer = f", tokenizer {folder['tokenizer']}" if folder.get("tokenizer") else ""
    return [f"folder: {folder['input']}: model {folder['model']}{tokenizer}{limit}"]


def summary_lines(report: dict[str, Any]) -> list[str]:
    totals = report["totals"]
    lines = _folder_lines(report.get("folder"))
    lines += [f"data: {item['description']}" for item in report.get("data") or []] + [
        f"layers: {totals['factorized']} factorized, {totals['skipped']} skipped",
        f"parameters: {human(totals['params_before'])} -> {human(totals['params_after'])} "
        f"({_ratio(totals['params_after'], totals['params_before'])} of the model)",
        f"bytes: {human(totals['bytes_before'])}B -> {human(totals['bytes_after'])}B",
        f"MACs (MatMul/Gemm/Conv with constant weights): {human(totals['macs_before'])} -> "
        f"{human(totals['macs_after'])} ({_ratio(totals['macs_after'], totals['macs_before'])})",
    ]
    if totals.get("subnormals_flushed"):
        lines.append(f"subnormal values flushed to zero in the written factors: {totals['subnormals_flushed']} "
                     "(they run many times slower on x86 CPUs)")
    stage = report.get("quantization")
    if stage:
        lines.append(f"quantized ({stage['mode']}): {human(stage['bytes_low_rank'])}B -> {human(stage['bytes_after'])}B "
                     f"({_ratio(stage['bytes_after'], totals['bytes_before'])} of the original's bytes)")
        if "correction" in stage:
            fix = stage["correction"]
            lines.append(f"corrected: {fix['layers']} 4-bit MatMuls, rank {fix['rank']} ({fix['allocation']}), "
                         f"{fix['dtype']} factors: {human(fix['bytes'])}B of the above")
        if "plan" in stage:
            lines.append(f"planned ({stage['plans']} plans, {stage['steps_written']} written and measured): "
                         + ", ".join(f"{count} {label}" for label, count in stage["plan"].items()))
        if "final" in stage:
            final = stage["final"]
            metric = next(key for key in final if key not in ("goal", "met"))
            lines.append(f"after quantization: held-out {metric} {final[metric]:.4f} "
                         f"({'meets' if final['met'] else 'misses'} {final['goal']:g})")
    plan = report.get("latency")
    if plan:
        lines.append(f"latency plan ({plan['source']}, {plan['provider']}, {plan['threads']} thread(s)): the "
                     f"{plan['timed_layers']} timed layers {plan['targets_ms']:.3f} -> {plan['planned_ms']:.3f} ms "
                     f"in isolation ({plan['planned_saving']:.1%} saved); {plan['timed_models']} models timed in "
                     f"{plan['timing_s']:.1f} s, {plan['reused_entries']} times reused")
    lines += speed_lines(report)
    cost = report.get("cost", {})
    if "after" in cost:
        before, after = cost["before"], cost["after"]
        per_unit = " (dims unknown to shape inference count as 1)" if before["unknown_dims"] else ""
        lines.append(f"model FLOPs: {human(before['flops'])} -> {human(after['flops'])} "
                     f"({_ratio(after['flops'], before['flops'])}){per_unit}")
    return lines


def speed_lines(report: dict[str, Any]) -> list[str]:
    """The written model against its input, end to end (--objective latency's confirmation, or the size objective's
    speed check), and the layers the confirmation put back."""
    confirmation = (report.get("latency") or {}).get("end_to_end")
    speed = confirmation["speed"] if confirmation else report.get("speed")
    if not speed:
        return []
    lines = [f"end to end ({speed['provider']}, {speed['threads']} thread(s), optimization level "
             f"{speed['optimization_level']}, {speed['runs']} interleaved runs): {speed['speedup']:.2f}x "
             f"(p10 {speed['p10']:.2f}, p90 {speed['p90']:.2f}; {speed['original_ms']:.3f} -> "
             f"{speed['rewritten_ms']:.3f} ms)"]
    if confirmation and confirmation["reverted"]:
        first = confirmation["before_reverts"]
        before = f" (the plan as first rewritten: {first['speedup']:.2f}x)" if first else ""
        lines.append(f"put back {len(confirmation['reverted'])} layer(s) whose rewrite did not pay in the whole "
                     f"model{before}")
    if not confirmation and speed["p90"] < 1.0:  # measurably slower: nine runs in ten
        lines.append("[yellow]warning: the written model is measurably slower than its input end to end; "
                     "--objective latency keeps only rewrites that pay[/]")
    return lines


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.1%}" if before else "-"


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(layer_table(report))
    for line in summary_lines(report):
        console.print(line, highlight=False)


def verification_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"onnxlr: verification on {result['samples']} sample(s)", title_justify="left")
    for column in ("provider", "output", "max abs", "mean abs", "max rel", "cosine", "sample cos", "SNR dB",
                   "top-1 / nbr@5", "result"):
        table.add_column(column, justify="left" if column in ("provider", "output", "result") else "right")
    for provider, entry in result["providers"].items():
        for kind, group in (("", entry["outputs"]), ("layer ", entry.get("layers", {}))):
            for name, m in group.items():
                if "max_abs" not in m:
                    table.add_row(provider, kind + name, *["-"] * 7, f"[red]{m['failure']}[/]")
                    continue
                verdict = {"pass": "[green]pass[/]", "not gated": "[yellow]not gated[/]"}.get(
                    output_verdict(m), f"[red]FAIL[/]: {m['failure']}")
                if kind:
                    verdict = "-"
                top1 = agreement_text(m)
                sample_cos = f"{m['mean_sample_cosine']:.6f}" if "mean_sample_cosine" in m else "-"
                snr = "-" if m["snr_db"] is None else ("inf" if m["snr_db"] == float("inf") else f"{m['snr_db']:.1f}")
                table.add_row(provider, kind + name, f"{m['max_abs']:.3g}", f"{m['mean_abs']:.3g}",
                              f"{m['max_rel']:.3g}", similarity(m), sample_cos, snr, top1, verdict)
    return table


def agreement_text(metrics: dict[str, Any]) -> str:
    """Top-1 agreement for scores, neighbour agreement (nbr) for embeddings, else "-"."""
    if "top1_agreement" in metrics:
        return f"{metrics['top1_agreement']:.3f}"
    if "neighbour_agreement" in metrics:
        return f"nbr {metrics['neighbour_agreement']:.3f}"
    return "-"


LAYER_ROWS_SHOWN = 10


def layer_check_table(provider: str, rows: list[dict[str, Any]]) -> Table:
    """The per-layer check (each factorized layer on the original's inputs), the worst layers first."""
    table = Table(title=f"onnxlr: per-layer check on {provider}, each layer on the original's inputs (worst first, "
                        f"{min(len(rows), LAYER_ROWS_SHOWN)} of {len(rows)})", title_justify="left")
    for column in ("layer", "rel error", "cosine", "result"):
        table.add_column(column, justify="left" if column in ("layer", "result") else "right")
    for row in rows[:LAYER_ROWS_SHOWN]:
        if row.get("error"):
            table.add_row(row["layer"], "-", "-", f"[red]{row['error']}[/]")
            continue
        verdict = "-" if not row["gated"] else ("[green]pass[/]" if row["passed"] else "[red]FAIL[/]")
        table.add_row(row["layer"], f"{row['relative_error']:.4f}", f"{row['cosine']:.6f}", verdict)
    return table


def output_verdict(metrics: dict[str, Any]) -> str:
    """"pass" only when a gate checked the output; "not gated" when none did; else "FAIL"."""
    if not metrics["passed"]:
        return "FAIL"
    return "pass" if metrics.get("gated") else "not gated"


def similarity(metrics: dict[str, Any]) -> str:
    """The cosine; for integer and boolean outputs their exact agreement (what their gate reads)."""
    if "agreement" in metrics:
        return f"agree {metrics['agreement']:.4f}"
    return f"{metrics['cosine']:.6f}"


def verification_verdict(result: dict[str, Any]) -> str:
    if not result["passed"]:
        return "FAILED"
    return "passed" if result.get("gated") else "not gated (no gate checked the outputs)"


def generation_line(check: dict[str, Any]) -> str:
    """One line on a KV-cache decoder's generation check (onnxlr.verification.generation)."""
    verdicts = ", ".join(f"{label} {'agree' if entry['agree'] else 'DIFFER'}" for label, entry in check["models"].items())
    return (f"generation ({check['steps']} greedy tokens from {check['prompts']} prompts, through the KV cache and "
            f"without it, cpu): {verdicts}")


def print_verification(result: dict[str, Any], console: Console) -> None:
    if result.get("inputs"):
        console.print(inputs_line(result["inputs"], result.get("synthesized", False)), highlight=False)
    console.print(verification_table(result))
    for provider, entry in result["providers"].items():
        if entry.get("layer_checks"):
            console.print(layer_check_table(provider, entry["layer_checks"]))
    for provider, entry in result["providers"].items():
        for name, metrics in entry.get("outputs", {}).items():
            if "accuracy" in metrics:
                console.print(f"accuracy on --labels ({name}, {provider}): original {metrics['reference_accuracy']:.4f}, "
                              f"written {metrics['accuracy']:.4f}", highlight=False)
            if "spearman" in metrics:
                console.print(f"Spearman on --pairs ({name}, {provider}, {metrics['pairs']} pairs): original "
                              f"{metrics['reference_spearman']:.4f}, written {metrics['spearman']:.4f} (between the "
                              f"models' similarities {metrics['similarity_spearman']:.4f})", highlight=False)
            if "perplexity" in metrics:
                console.print(f"next-token perplexity on the inputs ({name}, {provider}, {metrics['next_tokens']} "
                              f"tokens): original {metrics['reference_perplexity']:.3f}, written "
                              f"{metrics['perplexity']:.3f}", highlight=False)
    if result.get("generation"):
        console.print(generation_line(result["generation"]), highlight=False)
    for provider, entry in result["providers"].items():
        for name, noise in entry.get("reference_vs_cpu", {}).items():
            console.print(f"{provider} vs cpu (reference only, provider noise) {name}: max abs "
                          f"{noise['max_abs']:.3g}, cosine {noise['cosine']:.6f}", highlight=False)
    verdict = verification_verdict(result)
    color = {"passed": "green", "FAILED": "red"}.get(verdict, "yellow")
    console.print(f"verification: [{color}]{verdict}[/]")


def inputs_line(shapes: dict[str, list[int]], synthesized: bool) -> str:
    """`inputs (synthesized): x 8x3x32x32, sr scalar`: the shapes a run fed, and where they came from."""
    listed = ", ".join(f"{name} {'x'.join(map(str, shape)) or 'scalar'}" for name, shape in shapes.items())
    return f"inputs ({'synthesized' if synthesized else 'given'}): {listed}"


def print_bench(results: dict[str, Any], console: Console) -> None:
    if results.get("inputs"):
        console.print(inputs_line(results["inputs"], results.get("synthesized", False)), highlight=False)
    table = Table(title="onnxlr: latency (ms)", title_justify="left")
    for column in ("provider", "model", "p50", "p90", "p99", "mean", "std", "runs"):
        table.add_column(column, justify="left" if column in ("provider", "model") else "right")
    for provider, result in results["providers"].items():
        for row in result["models"]:
            table.add_row(provider, row["model"], f"{row['p50_ms']:.3f}", f"{row['p90_ms']:.3f}",
                          f"{row['p99_ms']:.3f}", f"{row['mean_ms']:.3f}", f"{row['std_ms']:.3f}", str(row["runs"]))
    console.print(table)
    files = results.get("files") or []
    if files:
        sizes = ", ".join(f"{Path(f['model']).name} {human(f['bytes'])}B" for f in files)
        ratio = f" ({files[1]['bytes'] / files[0]['bytes']:.3f}x)" if len(files) == 2 and files[0]["bytes"] else ""
        console.print(f"files: {sizes}{ratio}", highlight=False)
    for provider, result in results["providers"].items():
        if "speedup" in result:
            s = result["speedup"]
            console.print(f"{provider}: speedup {s['median']:.3f}x (p10 {s['p10']:.3f}, p90 {s['p90']:.3f}; "
                          "median of per-run ratios, interleaved)", highlight=False)
        if "profile" in result:
            console.print(profile_table(provider, result["profile"]))
            if result["profile"].get("grown"):
                console.print(grown_table(provider, result["profile"]))
        context = result["context"]
        console.print(f"{provider}: {context['cpu']}, {context['intra_op_threads']} thread(s), optimization "
                      f"{context['graph_optimization_level']}, onnxruntime {context['onnxruntime']}", highlight=False)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (a CI job summary or a pull-request comment)."""
    totals = report["totals"]
    lines = [
        "## onnxlr optimize",
        "",
        f"`{report.get('input', '?')}` -> `{report.get('output', '(not written)')}`, onnxlr {report['onnxlr_version']}",
        "",
        "| | before | after | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| parameters | {human(totals['params_before'])} | {human(totals['params_after'])} | "
        f"{_ratio(totals['params_after'], totals['params_before'])} |",
        f"| bytes | {human(totals['bytes_before'])}B | {human(totals['bytes_after'])}B | "
        f"{_ratio(totals['bytes_after'], totals['bytes_before'])} |",
        f"| MatMul/Gemm/Conv MACs | {human(totals['macs_before'])} | {human(totals['macs_after'])} | "
        f"{_ratio(totals['macs_after'], totals['macs_before'])} |",
    ]
    if totals.get("subnormals_flushed"):
        lines.append(f"| subnormal values flushed to zero (written factors) | | {totals['subnormals_flushed']} | |")
    stage = report.get("quantization")
    if stage:
        lines.append(f"| bytes after --quantize {stage['mode']} | {human(totals['bytes_before'])}B | "
                     f"{human(stage['bytes_after'])}B | {_ratio(stage['bytes_after'], totals['bytes_before'])} |")
    plan = report.get("latency")
    if plan:
        lines.append(f"| timed layers, ms in isolation ({plan['provider']}, {plan['threads']} thread(s)) | "
                     f"{plan['targets_ms']:.3f} | {plan['planned_ms']:.3f} | "
                     f"{_ratio(plan['planned_ms'], plan['targets_ms'])} |")
    speed = (plan or {}).get("end_to_end", {}).get("speed") or report.get("speed")
    if speed:
        lines.append(f"| whole model, ms end to end ({speed['provider']}, {speed['threads']} thread(s)) | "
                     f"{speed['original_ms']:.3f} | {speed['rewritten_ms']:.3f} | {speed['speedup']:.2f}x "
                     f"(p10 {speed['p10']:.2f}, p90 {speed['p90']:.2f}) |")
    cost = report.get("cost", {})
    if "after" in cost:
        lines.append(f"| model FLOPs | {human(cost['before']['flops'])} | {human(cost['after']['flops'])} | "
                     f"{_ratio(cost['after']['flops'], cost['before']['flops'])} |")
    lines += ["", f"{totals['factorized']} layers factorized, {totals['skipped']} skipped.", ""]
    verification = report.get("verification")
    if verification:
        lines += ["### Verification " + verification_verdict(verification), "",
                  "| provider | output | max abs | cosine | SNR dB | top-1 / nbr@5 | result |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for provider, entry in verification["providers"].items():
            for name, m in entry["outputs"].items():
                if "max_abs" not in m:
                    lines.append(f"| {provider} | {name} | - | - | - | - | {m['failure']} |")
                    continue
                snr = "-" if m["snr_db"] is None else f"{m['snr_db']:.1f}"
                top1 = agreement_text(m)
                verdict = output_verdict(m)
                result = f"FAIL: {m['failure']}" if verdict == "FAIL" else verdict
                lines.append(f"| {provider} | `{name}` | {m['max_abs']:.3g} | {similarity(m)} | {snr} | {top1} | "
                             f"{result} |")
        lines.append("")
        for provider, entry in verification["providers"].items():
            lines += _layer_check_markdown(provider, entry.get("layer_checks") or [])
    lines += ["### Layers", "",
              "| node | op | weight | scheme | rank | params | MACs | energy | status |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for layer in report["layers"]:
        factorized = layer["status"] == "factorized"
        shape = "x".join(str(d) for d in layer["weight_shape"]) if layer["weight_shape"] else "-"
        rank = f"{layer['rank']}/{layer['full_rank']}" if factorized else "-"
        energy = f"{layer['retained_energy']:.3f}" if layer["retained_energy"] is not None else "-"
        status = "factorized" if factorized else f"skipped: {layer['reason']}"
        if layer.get("partner"):
            status = f"joint with `{layer['partner']}`"
        lines.append(f"| `{layer['name']}` | {layer['op_type']} | {shape} | {layer['scheme'] or '-'} | {rank} | "
                     f"{_before_after(layer['params_before'], layer['params_after'], factorized)} | "
                     f"{_before_after(layer['macs_before'], layer['macs_after'], factorized)} | {energy} | {status} |")
    return "\n".join(lines).replace("->", "→") + "\n"


def _layer_check_markdown(provider: str, rows: list[dict[str, Any]]) -> list[str]:
    """The per-layer check's worst LAYER_ROWS_SHOWN layers, as layer_check_table prints them."""
    if not rows:
        return []
    lines = [f"#### Per-layer check on {provider}, each layer on the original's inputs (worst first, "
             f"{min(len(rows), LAYER_ROWS_SHOWN)} of {len(rows)})", "",
             "| layer | rel error | cosine | result |", "| --- | ---: | ---: | --- |"]
    for row in rows[:LAYER_ROWS_SHOWN]:
        if row.get("error"):
            lines.append(f"| `{row['layer']}` | - | - | FAIL: {row['error']} |")
            continue
        verdict = "-" if not row["gated"] else ("pass" if row["passed"] else "FAIL")
        lines.append(f"| `{row['layer']}` | {row['relative_error']:.4f} | {row['cosine']:.6f} | {verdict} |")
    return [*lines, ""]


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask (0644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it 0600; a report is as readable as the model it describes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def profile_table(provider: str, profile: dict[str, Any]) -> Table:
    table = Table(title=f"{provider}: per-layer kernel time (onnxruntime profiler, {profile['optimization_level']} "
                        "optimizations)", title_justify="left")
    for column in ("layer", "original us", "pair us", "speedup"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in profile["layers"]:
        original = "-" if row["original_us"] is None else f"{row['original_us']:.1f}"
        pair = "-" if row["pair_us"] is None else f"{row['pair_us']:.1f}"
        if row["speedup"] is None:
            speedup = "-"
        elif row["speedup"] >= 1:
            speedup = f"[green]{row['speedup']:.2f}x[/]"
        else:  # fewer MACs but slower: exactly what a user must see
            speedup = f"[red]{row['speedup']:.2f}x (slower)[/]"
        table.add_row(row["name"] + (" (joint)" if row.get("kind") == "joint" else ""), original, pair, speedup)
    return table


def grown_table(provider: str, profile: dict[str, Any]) -> Table:
    """The nodes whose time grew the most, onnxlr's pairs and the nodes it did not touch alike."""
    table = Table(title=f"{provider}: the kernels whose time grew the most (original -> rewritten, onnxruntime "
                        f"profiler, {profile.get('grown_optimization_level', 'all')} optimizations)",
                  title_justify="left")
    for column in ("node", "original us", "rewritten us", "growth us"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for row in profile["grown"]:
        before = "-" if row["original_us"] is None else f"{row['original_us']:.1f}"
        after = "-" if row["rewritten_us"] is None else f"{row['rewritten_us']:.1f}"
        table.add_row(row["name"] + (" (rewritten layer)" if row["touched"] else ""), before, after,
                      f"[red]+{row['growth_us']:.1f}[/]")
    return table


# ----------------------------------------------------------------------------- analyze


def analysis_table(result: dict[str, Any]) -> Table:
    energy = energy_key(result["energy"])
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


def analysis_summary_lines(result: dict[str, Any]) -> list[str]:
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
    for line in analysis_summary_lines(result):
        console.print(line)
    console.print("recommended:")
    console.print(result["recommendation"]["command"], markup=False, soft_wrap=True)


# ----------------------------------------------------------------------------- edge estimates


def print_estimates(targets: Mapping[str, dict[str, Any]], console: Any) -> None:
    """A small table clearly labelled as an estimate (bench: per model; optimize: before/after)."""
    table = Table(title="onnxlr: edge latency ESTIMATE (roofline from peak figures, not measured; ms)",
                  title_justify="left")
    for column in ("target", "precision", "model", "estimate ms", "speedup est."):
        table.add_column(column, justify="left" if column in ("target", "precision", "model") else "right")
    for key, entry in targets.items():
        rows = entry["models"] if "models" in entry else [
            {"model": "before", **entry["before"]}, {"model": "after", **entry["after"]}]
        speedup = entry.get("speedup_estimate")
        for index, row in enumerate(rows):
            last = index == len(rows) - 1
            table.add_row(key if index == 0 else "", row["precision"], str(row["model"]), f"{row['estimate_ms']:.3f}",
                          f"{speedup:.2f}x" if last and speedup is not None else "")
    console.print(table)
    console.print("figures and their sources: the JSON's targets.*.figures; built-in profiles: " + BUILTIN,
                  highlight=False)
