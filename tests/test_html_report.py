"""optimize --html: one self-contained page from the report dict, written (or not) like --report."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

from click.testing import CliRunner
from graphs import onnxlr_cli

from onnxlr.cli import cli
from onnxlr.render.html_report import render_html

VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class Page(HTMLParser):
    """Tags kept balanced (a stack), table rows by table id as lists of cell texts, images and SVGs counted."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.table: str | None = None
        self.cell: list[str] | None = None
        self.figures: list[str] = []
        self.svgs = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self.table = attrs.get("id") or ""
            self.tables.setdefault(self.table, [])
        elif tag == "tr" and self.table is not None:
            self.tables[self.table].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "figure":
            self.figures.append(attrs.get("id", ""))
        elif tag == "svg":
            self.svgs += 1

    def handle_startendtag(self, tag, attrs):
        # Self-closed SVG elements (<path .../>) open nothing.
        pass

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "table":
            self.table = None
        elif tag in ("td", "th") and self.cell is not None:
            self.tables[self.table][-1].append(" ".join(" ".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def assert_self_contained(text: str) -> None:
    for pattern in (r"https?://", r"//cdn", r"<script", r"<link", r"@import", r"<iframe"):
        assert not re.search(pattern, text, re.I), pattern
    # Any src= or url(...) must stay inside the page: data: URIs and #fragments only.
    for target in re.findall(r"""src\s*=\s*["']?([^"'\s>]+)""", text, re.I):
        assert target.startswith("data:"), target
    for target in re.findall(r"url\(\s*['\"]?([^)'\"]*)", text):
        assert target.startswith(("#", "data:")), target
    for target in re.findall(r"""href\s*=\s*["']([^"']*)""", text, re.I):
        assert target.startswith("#"), target


def test_html_page_from_a_verified_run(small_model, tmp_path):
    out, report_path, page_path = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "sub" / "r.html"
    result = onnxlr_cli("optimize", small_model, out, "--rank-ratio", "0.25", "--min-cosine", "0.1",
                        "--report", report_path, "--html", page_path, "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    text = page_path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.stack == []  # every element closed, in order
    assert_self_contained(text)

    rows = {row[0]: row for row in page.tables["layers"][1:] if row and row[0] != "total"}
    factorized = [layer for layer in report["layers"] if layer["status"] == "factorized"]
    assert {layer["name"] for layer in factorized} == {"conv", "head"}
    for layer in factorized:
        row = rows[layer["name"]]
        assert "factorized" in row
        assert f"{layer['rank']} / {layer['full_rank']}" in row
        assert f"{layer['params_before']:,}" in row and f"{layer['params_after']:,}" in row  # thousands separators
    totals = report["totals"]
    assert any(f"{totals['params_before']:,}" in row for row in page.tables[""])  # the totals table

    verification = page.tables["verification"]
    assert verification[1][:2] == ["cpu", "logits"] and "pass" in verification[1][-1]
    assert {row[0].split()[0] for row in page.tables["targets"][1:]} >= {"rpi4", "jetson-orin-nano"}
    assert "ESTIMATE" in text and Path(out).name in text and report["onnxlr_version"] in text
    assert {"plot-params", "plot-macs", "plot-ranks", "plot-errors", "plot-targets"} <= set(page.figures)
    assert page.svgs == len(page.figures)  # one inline SVG per plot, nothing else
    assert "plot-latency" not in page.figures  # the report holds no bench figures


def test_failed_gate_writes_no_model_and_a_page_that_says_why(small_model, tmp_path):
    out, page_path = tmp_path / "out.onnx", tmp_path / "r.html"
    result = onnxlr_cli("optimize", small_model, out, "--rank", "1", "--min-cosine", "0.999999", "--html", page_path,
                        "-q")
    assert result.returncode == 1 and "verification failed" in result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "r.html"]
    text = page_path.read_text()  # like --report: the figures that failed the gate are the point
    assert "verification FAILED" in text and "not written" in text and "FAIL:" in text


def test_bad_input_writes_nothing(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    args = ["optimize", str(tmp_path / "empty.onnx"), str(tmp_path / "out.onnx"), "--html", str(tmp_path / "r.html")]
    result = CliRunner().invoke(cli, args)  # in process (fast); the exit path is the one a subprocess takes
    assert result.exit_code == 2 and "empty" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.onnx"]


def test_dry_run_page_has_the_plan_and_no_verification(small_model, tmp_path):
    out, page_path = tmp_path / "out.onnx", tmp_path / "plan.html"
    args = ["optimize", str(small_model), str(out), "--dry-run", "--rank", "2", "--html", str(page_path), "-q"]
    result = CliRunner().invoke(cli, args)  # in process: the subprocess runs above cover the entry point
    assert result.exit_code == 0, result.output
    assert not out.exists()
    page = Page(page_path.read_text())
    assert {"plot-params", "plot-macs", "plot-ranks"} == set(page.figures)  # no errors, no estimates
    assert "verification" not in page.tables and {row[0] for row in page.tables["layers"][1:3]} == {"conv", "head"}


def test_help_mentions_html():
    result = CliRunner().invoke(cli, ["optimize", "--help"])  # in process: help needs no real run
    assert result.exit_code == 0 and "--html" in result.output and "FILE.html" in result.output


def test_optional_sections_appear_with_their_data_only():
    layer = {"name": "fc <1>", "op_type": "MatMul", "status": "skipped", "reason": "weight is a graph input",
             "weight": "w", "weight_shape": [4, 4], "scheme": None, "rank": None, "full_rank": 4,
             "break_even_rank": 2, "retained_energy": None, "method": None, "params_before": 16, "params_after": 16,
             "macs_before": None, "macs_after": None, "shared_with": []}
    report = {"onnxlr_version": "0.0", "input": "m.onnx", "settings": {"rank": 2},
              "totals": {"params_before": 16, "params_after": 16, "bytes_before": 64, "bytes_after": 64,
                         "macs_before": 0, "macs_after": 0, "factorized": 0, "skipped": 1},
              "layers": [layer]}
    page = Page(render_html(report))
    assert page.figures == ["plot-params"]  # no MACs, nothing factorized: those plots are left out
    assert "fc <1>" in page.tables["layers"][1][0]  # escaped in the source, the same text on screen

    report["bench"] = {"providers": {"cpu": {
        "models": [{"model": "a/m.onnx", "p50_ms": 2.0, "p90_ms": 2.5, "p99_ms": 3.0, "mean_ms": 2.1, "std_ms": 0.2,
                    "runs": 1200},
                   {"model": "a/m-lr.onnx", "p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 1.5, "mean_ms": 1.1,
                    "std_ms": 0.1, "runs": 1200}],
        "speedup": {"median": 2.0, "p10": 1.8, "p90": 2.2}}}}
    text = render_html(report)
    page = Page(text)
    assert "plot-latency" in page.figures and page.tables["latency"][1][:3] == ["cpu", "m.onnx", "2.000"]
    assert "1,200" in page.tables["latency"][1] and "speedup 2.00x" in text
    assert_self_contained(text)
