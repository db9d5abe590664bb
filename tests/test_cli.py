"""The command line as a user runs it: real subprocesses, exit codes, files written or not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import assert_outputs_close, onnxlr_cli, run


def test_version_and_help():
    result = onnxlr_cli("--version")
    assert result.returncode == 0 and "onnxlr" in result.stdout
    result = onnxlr_cli("optimize", "--help")
    assert result.returncode == 0
    for flag in ("--rank-ratio", "--rank ", "--energy", "--param-ratio", "--param-budget", "--rank-multiple",
                 "--allow-no-gain", "--min-params", "--include", "--exclude", "--ops", "--conv-scheme",
                 "--dry-run", "--report", "Examples:"):
        assert flag in result.stdout, flag


def test_optimize_writes_model_report_and_table(small_model, tmp_path):
    out = tmp_path / "sub" / "out.onnx"
    report_path = tmp_path / "report.json"
    before = small_model.read_bytes()
    # --no-gate: this test is about what is written, not about quality (random weights at rank 0.25).
    result = onnxlr_cli("optimize", small_model, out, "--rank-ratio", "0.25", "--report", report_path, "--no-gate")
    assert result.returncode == 0, result.stderr
    assert small_model.read_bytes() == before  # input untouched
    assert "per-layer plan" in result.stdout and "head" in result.stdout and "parameters:" in result.stdout
    report = json.loads(report_path.read_text())
    assert set(report["totals"]) >= {"params_before", "params_after", "macs_before", "macs_after",
                                     "bytes_before", "bytes_after"}
    for row in report["layers"]:
        assert set(row) >= {"name", "op_type", "status", "reason", "scheme", "rank", "full_rank",
                            "params_before", "params_after", "macs_before", "macs_after"}
        assert row["status"] in ("factorized", "skipped")
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    new_model = onnx.load(out)
    onnx.checker.check_model(new_model, full_check=True)
    feeds = {"img": np.random.default_rng(1).standard_normal((3, 16, 6, 6)).astype(np.float32)}
    assert run(new_model, feeds)[0].shape == (3, 10)


def test_full_rank_cli_run_is_exact(small_model, tmp_path):
    out = tmp_path / "out.onnx"
    result = onnxlr_cli("optimize", small_model, out, "--rank-ratio", "1", "--allow-no-gain", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # --quiet
    feeds = {"img": np.random.default_rng(2).standard_normal((2, 16, 6, 6)).astype(np.float32)}
    assert_outputs_close(run(onnx.load(small_model), feeds), run(onnx.load(out), feeds))


def test_dry_run_writes_nothing(small_model, tmp_path):
    out = tmp_path / "out.onnx"
    result = onnxlr_cli("optimize", small_model, out, "--dry-run", "--energy", "0.9")
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    assert "per-layer plan" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--rank-ratio", "0"], "rank-ratio"),
    (["--rank-ratio", "-1"], "rank-ratio"),
    (["--rank-ratio", "1.5"], "rank-ratio"),
    (["--rank-ratio", "nan"], "--rank-ratio must be a number"),  # the flag, not the keyword
    (["--rank-ratio", "half"], "rank-ratio"),
    (["--rank-ratio", "0.5", "--energy", "0.9"], "one rank policy"),
    (["--ops", "Softmax"], "unsupported op"),
    (["--conv-scheme", "diagonal"], "conv-scheme"),
])
def test_bad_flags_exit_2_without_traceback_or_output(small_model, tmp_path, args, message):
    out = tmp_path / "out.onnx"
    result = onnxlr_cli("optimize", small_model, out, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_output_and_bad_input(tmp_path, small_model):
    result = onnxlr_cli("optimize", small_model)
    assert result.returncode == 2 and "missing OUTPUT" in result.stderr
    result = onnxlr_cli("optimize", tmp_path, tmp_path / "out.onnx")
    assert result.returncode == 2 and "folder" in result.stderr
    (tmp_path / "empty.onnx").write_bytes(b"")
    result = onnxlr_cli("optimize", tmp_path / "empty.onnx", tmp_path / "out.onnx")
    assert result.returncode == 2 and "empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "out.onnx").exists()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "onnxlr"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "onnxlr" in result.stdout


def test_markdown_report(small_model, tmp_path):
    markdown = tmp_path / "summary.md"
    result = onnxlr_cli("optimize", small_model, tmp_path / "out.onnx", "--rank", "2", "--markdown", markdown, "-q",
                        "--min-cosine", "0.1")
    assert result.returncode == 0, result.stderr
    text = markdown.read_text()
    assert text.startswith("## onnxlr optimize")
    assert "| `head` | Gemm |" in text and "| `conv` | Conv |" in text
    assert "### Verification passed" in text
