"""optimize --html with --methods svd,joint: each coupled pair is one bracketed row group in the layer table."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import init, make_model, tensor_input
from onnx import helper
from test_html_report import Page, assert_self_contained

from onnxlr.cli import cli

D_IN, WIDTH = 32, 128


class LayerGroups(HTMLParser):
    """The layer table's row groups: per <tbody>, its class, its head row's text and its rows' node names."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.groups: list[dict] = []
        self.in_layers = False
        self.in_body = False
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.head = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.in_layers = attrs.get("id") == "layers"
        elif not self.in_layers:
            return
        elif tag == "tbody":
            self.groups.append({"class": attrs.get("class") or "", "head": "", "rows": []})
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.head = "pair-head" in (attrs.get("class") or "")
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_layers = False
        elif not self.in_layers:
            return
        elif tag in ("td", "th") and self.cell is not None:
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            if self.head:
                self.groups[-1]["head"] = self.row[0]
            elif self.row:
                self.groups[-1]["rows"].append(self.row)
            self.row = None
        elif tag == "tbody":
            self.in_body = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def two_mlps(rng):
    """Two redundant MLPs side by side (a and b) and a plain head, nodes interleaved: up_a, up_b, ..., down_a, down_b.

    Graph order then puts up_b between up_a and its partner down_a: the page must still show each pair together."""
    nodes, weights = [], []
    for tag in ("a", "b"):
        base = rng.standard_normal((D_IN, WIDTH // 2)).astype(np.float32) / 6
        weights += [init(f"W1{tag}", np.concatenate([base, base * 1.01], axis=1)),
                    init(f"b1{tag}", (rng.standard_normal(WIDTH) * 0.1).astype(np.float32)),
                    init(f"W2{tag}", (rng.standard_normal((WIDTH, D_IN)) / 10).astype(np.float32))]
    nodes += [helper.make_node("MatMul", ["x", f"W1{t}"], [f"h{t}"], name=f"up_{t}") for t in "ab"]
    nodes += [helper.make_node("Add", [f"h{t}", f"b1{t}"], [f"hb{t}"], name=f"up_bias_{t}") for t in "ab"]
    nodes += [helper.make_node("Relu", [f"hb{t}"], [f"z{t}"], name=f"act_{t}") for t in "ab"]
    nodes += [helper.make_node("MatMul", [f"z{t}", f"W2{t}"], [f"y{t}"], name=f"down_{t}") for t in "ab"]
    nodes += [helper.make_node("Add", ["ya", "yb"], ["s"], name="sum"),
              helper.make_node("MatMul", ["s", "Wh"], ["out"], name="head")]
    weights.append(init("Wh", rng.standard_normal((D_IN, 48)).astype(np.float32)))
    return make_model(nodes, [tensor_input("x", ["n", D_IN])], [tensor_input("out", None)], weights, opset=20)


@pytest.fixture()
def pair_model(tmp_path):
    rng = np.random.default_rng(7)
    source, calibration = tmp_path / "in.onnx", tmp_path / "calib.npz"
    onnx.save(two_mlps(rng), str(source))
    np.savez(calibration, x=rng.standard_normal((48, D_IN)).astype(np.float32))
    return source, calibration


def optimize_page(tmp_path, source, calibration, methods):
    """The real CLI (in process): the report dict and the page it wrote with --html."""
    report_path, page_path = tmp_path / f"{methods}.json", tmp_path / f"{methods}.html"
    args = ["optimize", str(source), str(tmp_path / f"{methods}.onnx"), "--param-ratio", "0.5", "--methods", methods,
            "--calibration", str(calibration), "--no-gate", "--report", str(report_path), "--html", str(page_path),
            "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(report_path.read_text()), page_path.read_text(encoding="utf-8")


def test_joint_pairs_are_one_group_each(pair_model, tmp_path):
    report, text = optimize_page(tmp_path, *pair_model, "svd,joint")
    rows = {row["name"]: row for row in report["layers"]}
    assert [row["name"] for row in report["layers"]][:4] == ["up_a", "up_b", "down_a", "down_b"]  # graph order
    for tag in "ab":
        assert rows[f"up_{tag}"]["method"] == rows[f"down_{tag}"]["method"] == "joint"
        assert rows[f"up_{tag}"]["partner"] == f"down_{tag}"

    page = Page(text)
    assert page.stack == [] and "layers" in page.tables  # balanced tags, the layer table parsed
    assert_self_contained(text)
    groups = LayerGroups(text).groups
    order = [row[0] for group in groups for row in group["rows"]]
    assert order[:4] == ["up_a", "down_a", "up_b", "down_b"]  # the partner moved up beside its up layer
    pairs = [group for group in groups if group["class"] == "pair"]
    assert [[row[0] for row in group["rows"]] for group in pairs] == [["up_a", "down_a"], ["up_b", "down_b"]]
    for group in pairs:
        up = rows[group["rows"][0][0]]
        kept, width = up["rank"], up["full_rank"]
        assert width == WIDTH and 0 < kept < WIDTH
        assert f"joint pair: keeps {kept} of {width} neurons" in group["head"]
        before = sum(rows[row[0]]["params_before"] for row in group["rows"])
        after = sum(rows[row[0]]["params_after"] for row in group["rows"])
        assert f"params {before:,} → {after:,}" in group["head"]
        for row in group["rows"]:
            assert f"{kept} / {width}" in row and "joint" in row  # rank cell, scheme cell
        assert f"joint with {group['rows'][1][0]}" in group["rows"][0][-1]
    # The head row stays outside any pair; the legend and the totals name the pairs once.
    assert any(group["class"] == "" and [row[0] for row in group["rows"]] == ["head"] for group in groups)
    assert "legend" in text and "Joint pair" in text and "2 (4 layers)" in text
    assert rows["head"]["status"] == "factorized" and rows["head"]["method"] != "joint"


def test_without_joint_rows_there_is_no_pair_group(pair_model, tmp_path):
    report, text = optimize_page(tmp_path, *pair_model, "svd")
    assert not any(row.get("partner") or row.get("method") == "joint" for row in report["layers"])
    groups = LayerGroups(text).groups
    assert [group["class"] for group in groups] == [""]  # one plain row group, in graph order
    assert [row[0] for row in groups[0]["rows"]][:4] == ["up_a", "up_b", "down_a", "down_b"]
    body = text.split("</style>", 1)[1]  # the style sheet names the pair classes whatever the report holds
    assert "pair-head" not in body and "joint pair" not in body.lower()  # no group head, legend or pair count
    assert Page(text).stack == []
