"""The per-layer check: each factorized layer on the original layer's input, against the original layer's output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import onnxlr_cli
from onnx import numpy_helper
from test_segments import mlp_file

import onnxlr
from onnxlr.verification import verify


def rewritten(tmp_path, **settings):
    path = mlp_file(tmp_path)
    model, _ = onnxlr.optimize(str(path), **settings, verify=False)
    onnxlr.save(model, tmp_path / "lr.onnx", external_data=True)
    return path, tmp_path / "lr.onnx"


def layer_rows(reference, candidate, feeds, **options):
    gates = verify.Gates.chosen(default_gate=False)
    result = verify.verify(str(reference), str(candidate), feeds, ["cpu"], gates, batch_size=4, **options)
    return result, result.providers["cpu"]["layer_checks"]


FEEDS = {"x": np.random.default_rng(7).standard_normal((6, 3, 32)).astype(np.float32)}


def test_at_full_rank_every_layer_is_exact(tmp_path):
    reference, candidate = rewritten(tmp_path, rank_ratio=1.0, allow_no_gain=True)
    result, rows = layer_rows(reference, candidate, FEEDS, segment_budget=5000)
    # The MatMuls have no names: a layer is then named by its output.
    assert sorted(row["layer"] for row in rows) == ["h0", "h1", "h2", "h3"]
    assert all(row["cosine"] > 1 - 1e-6 and row["relative_error"] < 1e-5 for row in rows)
    assert result.passed


def test_metrics_are_those_of_the_layer_alone_and_worst_first(tmp_path):
    """W0's row is ||x A B - x W0|| / ||x W0|| computed here from the written factors, whatever the later layers do."""
    reference, candidate = rewritten(tmp_path, rank_ratio=0.25)
    _, rows = layer_rows(reference, candidate, FEEDS, segment_budget=5000)
    assert [row["cosine"] for row in rows] == sorted(row["cosine"] for row in rows)
    weights = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in onnx.load(str(candidate)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in onnx.load(str(reference)).graph.initializer}
    factors = [weights[name] for name in sorted(weights) if name.startswith("W0_lr")]
    assert len(factors) == 2
    expected, got = FEEDS["x"] @ original["W0"], FEEDS["x"] @ factors[0] @ factors[1]
    row = next(row for row in rows if row["output"] == "h0")
    assert row["relative_error"] == pytest.approx(np.linalg.norm(got - expected) / np.linalg.norm(expected), rel=1e-4)
    cosine = float(np.sum(got * expected) / np.linalg.norm(got) / np.linalg.norm(expected))
    assert row["cosine"] == pytest.approx(cosine, abs=1e-5) and 0 < row["cosine"] < 0.999
    assert not row["gated"] and row["passed"]


def test_min_layer_cosine_gates_whole_or_in_segments(tmp_path):
    reference, candidate = rewritten(tmp_path, rank_ratio=0.25)
    for budget in (None, 5000):  # without a budget: one segment, the whole model
        result, rows = layer_rows(reference, candidate, FEEDS, segment_budget=budget, min_layer_cosine=0.999)
        assert not result.passed and len(rows) == 4 and all(row["gated"] for row in rows)
        assert any("under --min-layer-cosine 0.999" in failure for failure in result.failures)
        result, _ = layer_rows(reference, candidate, FEEDS, segment_budget=budget, min_layer_cosine=-1.0)
        assert result.passed
    cli = onnxlr_cli("verify", str(reference), str(candidate), "--no-gate", "--min-layer-cosine", "0.999")
    assert cli.returncode != 0 and "per-layer check on cpu" in cli.stdout and "FAIL" in cli.stdout


def test_a_layer_that_fails_to_run_fails_verification_not_the_reference(tmp_path):
    """A broken factor (wrong inner size) is the candidate's fault: a failed layer row, never a bad-input error."""
    from model_files import save_external

    reference, candidate = rewritten(tmp_path, rank_ratio=0.25)
    model = onnx.load(str(candidate))
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name.startswith("W0_lr") and t.dims[0] < 32)
    broken = numpy_helper.to_array(model.graph.initializer[index])
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.vstack([broken, broken[:1]]),
                                                                    model.graph.initializer[index].name))
    save_external(model, tmp_path / "broken.onnx", location="broken.data")
    result, rows = layer_rows(reference, tmp_path / "broken.onnx", FEEDS, segment_budget=5000)
    assert not result.passed and rows[0]["output"] == "h0" and rows[0]["error"]
    assert any("factorized layer(s) fail on cpu: h0" in failure for failure in result.failures)
    assert all(row["cosine"] is not None for row in rows[1:])  # the other layers are still checked


def test_markdown_and_html_reports_show_the_per_layer_check(tmp_path):
    """optimize's --markdown and --html list the per-layer check, worst first, with its gate's verdicts."""
    source = mlp_file(tmp_path)
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--rank-ratio", "0.25", "--no-gate",
                        "--min-layer-cosine", "0.0", "--markdown", str(tmp_path / "r.md"), "--html",
                        str(tmp_path / "r.html"), "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["verification"]["providers"]["cpu"]["layer_checks"]
    markdown = (tmp_path / "r.md").read_text()
    assert "#### Per-layer check on cpu" in markdown
    section = markdown.split("#### Per-layer check on cpu", 1)[1].split("\n\n")[1]  # the table after the heading
    table = [line for line in section.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == [row["layer"] for row in rows]
    assert all(line.endswith("| pass |") for line in table)
    page = (tmp_path / "r.html").read_text()
    assert "Per-layer check on cpu" in page and f"{rows[0]['cosine']:.6f}" in page
