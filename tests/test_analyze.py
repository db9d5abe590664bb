"""onnxlr analyze: statistics on spectra known in closed form, the report files, and the CLI."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import ONNXLR, init, make_model, onnxlr_cli, tensor_input
from onnx import helper
from onnxlr.passes import Scheme

from onnxlr.analyze import (
    analyze_model,
    combined_singular_values,
    effective_rank,
    fit_power_law,
    stable_rank,
    view_statistics,
)
from onnxlr.factorize import lowrank
from onnxlr.model_io.io import load
from onnxlr.render.html_analyze import render_html


def matmul_scheme(matrix: np.ndarray) -> Scheme:
    m, n = matrix.shape
    return Scheme(name="matmul", matrices=matrix[None], params_before=m * n, macs_before=m * n,
                  params_per_rank=m + n, macs_per_rank=m + n)


def with_spectrum(s: np.ndarray, m: int, n: int, seed: int = 0) -> np.ndarray:
    """An m x n matrix whose singular values are `s` (random orthonormal bases)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


def stats(matrix: np.ndarray, energy: float = 0.95) -> dict:
    return view_statistics(matmul_scheme(matrix), lowrank.svd(matrix[None]), energy)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [1, 7, 20, 64])
def test_identity(n):
    result = stats(np.eye(n))
    assert result["effective_rank"] == pytest.approx(n)
    assert result["stable_rank"] == pytest.approx(n)
    for level in (0.9, 0.95, 0.99):
        assert result["energy_ranks"][f"{level:g}"] == math.ceil(level * n)
    assert result["full_rank"] == n
    assert result["break_even_rank"] == math.ceil(n / 2)  # gains while r * 2n < n^2


@pytest.mark.parametrize("k", [1, 3, 10])
def test_exact_low_rank(k):
    rng = np.random.default_rng(k)
    matrix = rng.standard_normal((48, k)) @ rng.standard_normal((k, 32))
    result = stats(matrix)
    assert result["energy_ranks"]["0.99"] <= k
    assert result["effective_rank"] <= k + 1e-6
    assert result["stable_rank"] <= k + 1e-6
    assert max(result["singular_values"][k:]) < 1e-9 * result["singular_values"][0]
    assert result["compressible"] == (k < result["break_even_rank"])


def test_exact_rank_k_equal_values():
    # Equal nonzero singular values: r99 is exactly k and the effective rank exactly k.
    k = 6
    matrix = with_spectrum(np.r_[np.ones(k), np.zeros(10)], 40, 30)
    result = stats(matrix)
    assert result["energy_ranks"]["0.99"] == k
    assert result["effective_rank"] == pytest.approx(k, rel=1e-6)
    assert result["stable_rank"] == pytest.approx(k, rel=1e-6)


def test_geometric_decay_closed_form():
    n, q = 40, 0.8
    s = q ** np.arange(n)
    result = stats(with_spectrum(s, 50, 45))
    for level in (0.9, 0.95, 0.99):
        # sum_{i<r} q^2i / sum_{i<n} q^2i >= E  <=>  r >= log(1 - E (1 - q^2n)) / log(q^2)
        expected = math.ceil(math.log(1 - level * (1 - q ** (2 * n))) / math.log(q**2))
        assert result["energy_ranks"][f"{level:g}"] == expected
    assert result["stable_rank"] == pytest.approx((1 - q ** (2 * n)) / (1 - q**2), rel=1e-9)
    p = s / s.sum()
    assert result["effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)


def test_degenerate_spectra():
    assert effective_rank(np.zeros(5)) == 0.0 and stable_rank(np.zeros(5)) == 0.0
    assert effective_rank(np.array([3.0, 0, 0])) == pytest.approx(1.0)
    assert stable_rank(np.array([3.0, 0, 0])) == pytest.approx(1.0)


def test_groups_combine_as_the_rank_rules_sum():
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((3, 8, 5))
    decomposition = lowrank.svd(stack)
    s = combined_singular_values(decomposition)
    np.testing.assert_allclose(np.cumsum(s**2) / np.sum(s**2), decomposition.cumulative_energy())


def test_power_law_fit_recovers_the_exponent():
    rng = np.random.default_rng(0)
    alpha, xmin = 2.5, 1.0
    tail = xmin * (1 - rng.random(4000)) ** (-1 / (alpha - 1))  # inverse-CDF samples of p(x) ~ x^-alpha
    bulk = rng.uniform(0.05, xmin, 1000)  # not power-law below xmin: the KS search must skip it
    fit = fit_power_law(np.r_[tail, bulk])
    assert fit is not None
    assert fit["alpha"] == pytest.approx(alpha, abs=0.15)
    assert 0.5 <= fit["xmin"] <= 2.0
    assert fit["tail_size"] >= 10


def test_power_law_fit_declines_what_it_cannot_fit():
    assert fit_power_law(np.ones(100)) is None  # no slope
    assert fit_power_law(np.arange(1.0, 6.0)) is None  # too few values


# ----------------------------------------------------------------------------- a model


def build_model(tmp_path: Path) -> Path:
    """Conv (random: keep dense) -> MatMul (rank 4: compressible) -> Gemm 10-way head (no gain)."""
    rng = np.random.default_rng(0)
    low_rank = (rng.standard_normal((576, 4)) @ rng.standard_normal((4, 64))).astype(np.float32)
    nodes = [helper.make_node("Conv", ["img", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "W1"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["g"]),
             helper.make_node("Gemm", ["g", "W2", "b2"], ["logits"], name="head", transB=1)]
    inits = [init("K", rng.standard_normal((16, 8, 3, 3)).astype(np.float32)),
             init("W1", low_rank),
             init("W2", rng.standard_normal((10, 64)).astype(np.float32)),
             init("b2", np.zeros(10, np.float32))]
    model = make_model(nodes, [tensor_input("img", ["batch", 8, 6, 6])], [tensor_input("logits", ["batch", 10])],
                       inits)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def test_analyze_model(tmp_path):
    path = build_model(tmp_path)
    result = analyze_model(load(path).model, model_path=str(path))
    layers = {layer["name"]: layer for layer in result["layers"]}
    assert set(layers) == {"conv", "proj", "head"}
    assert [v["scheme"] for v in layers["conv"]["views"]] == ["output", "input", "spatial"]
    proj = layers["proj"]
    assert proj["energy_ranks"]["0.99"] == 4 and proj["compressible"]
    assert proj["recommended"] == {**proj["recommended"], "dense": False, "rank": 4, "scheme": "matmul"}
    assert not layers["head"]["compressible"] and layers["head"]["recommended"]["dense"]
    for layer in result["layers"]:
        for key in ("effective_rank", "stable_rank", "break_even_rank", "energy_ranks", "singular_values",
                    "power_law"):
            assert key in layer
        assert set(layer["energy_ranks"]) == {"0.9", "0.95", "0.99"}
    summary = result["summary"]
    assert summary["layers"] == 3 and summary["params_after"] < summary["params_before"]
    assert "--exclude head" in result["recommendation"]["command"]


def test_param_budget_plan(tmp_path):
    path = build_model(tmp_path)
    result = analyze_model(load(path).model, model_path=str(path), param_budget=0.5)
    assert result["summary"]["param_ratio"] <= 0.5
    assert "--param-budget 0.5" in result["recommendation"]["command"]
    assert "--exclude" not in result["recommendation"]["command"]


def test_html_is_self_contained_with_one_figure_per_layer(tmp_path):
    path = build_model(tmp_path)
    page = render_html(analyze_model(load(path).model, model_path=str(path)))
    for forbidden in ("http://", "https://", "//cdn", "<script", "<link", "@import", "src="):
        assert forbidden not in page, forbidden
    assert not re.findall(r"url\((?!#)", page)  # only in-page references (SVG clip paths)
    assert page.count("class='layer-figure'") == 3
    assert page.count("<svg") == 4  # one per layer and the overview


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_html_and_its_command_runs(tmp_path):
    path = build_model(tmp_path)
    result = onnxlr_cli("analyze", path, "--json", tmp_path / "a.json", "--html", tmp_path / "a.html")
    assert result.returncode == 0, result.stderr
    assert "break-even" in result.stdout and "compressible" in result.stdout
    data = json.loads((tmp_path / "a.json").read_text())
    assert {"layers", "summary", "recommendation", "skipped"} <= set(data)
    page = (tmp_path / "a.html").read_text()
    assert "http" not in page and page.count("class='layer-figure'") == len(data["layers"])

    # The printed command, run as printed (only the program is this interpreter's onnxlr).
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("onnxlr optimize ") and line == data["recommendation"]["command"]
    argv = shlex.split(line)
    report = tmp_path / "report.json"
    run = subprocess.run([*ONNXLR, *argv[1:], "--report", str(report), "-q"], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr
    assert Path(argv[3]).exists()
    rows = {row["name"]: row for row in json.loads(report.read_text())["layers"]}
    for name, rank in data["recommendation"]["ranks"].items():
        assert rows[name]["rank"] == rank, name
        assert (rows[name]["status"] == "factorized") == (rank is not None)


def test_cli_calibration_whitens_matmul_and_conv_spectra(tmp_path):
    path = build_model(tmp_path)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, img=np.random.default_rng(1).standard_normal((16, 8, 6, 6)).astype(np.float32))
    result = onnxlr_cli("analyze", path, "--calibration", calibration, "--json", tmp_path / "a.json")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "a.json").read_text())
    methods = {layer["name"]: layer["method"] for layer in data["layers"]}
    assert methods == {"conv": "whitened", "proj": "whitened", "head": "whitened"}  # conv: its patches
    assert f"--calibration {calibration}" in data["recommendation"]["command"]


@pytest.mark.parametrize("args", [
    ["--energy", "0.9", "--param-budget", "0.5"],
    ["--energy", "1.5"],
    ["--param-budget", "0.0001"],
    ["--calibration-samples", "3"],
])
def test_cli_bad_usage_exits_2(tmp_path, args):
    result = onnxlr_cli("analyze", build_model(tmp_path), *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_cli_bad_model_exits_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    for path in (bad, tmp_path / "missing.onnx"):
        result = onnxlr_cli("analyze", path)
        assert result.returncode == 2 and "Traceback" not in result.stderr


def test_cli_help_has_examples():
    result = onnxlr_cli("analyze", "--help")
    assert result.returncode == 0
    for text in ("--energy", "--param-budget", "--calibration", "--json", "--html", "Examples:"):
        assert text in result.stdout
