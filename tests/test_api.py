"""The Python API runs the whole job as the CLI does (onnxlr.job): it verifies and gates by default, its result carries
the verification, it writes atomically when given an output, and it fails with the CLI's sentence."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import onnx
import onnx_ir as ir
import pytest
from graphs import onnxlr_cli

import models
import onnxlr
from onnxlr.errors import GateFailed, OnnxlrError


def test_api_verifies_by_default_and_the_report_carries_it(small_model):
    model, report = onnxlr.optimize(str(small_model), rank_ratio=1.0, allow_no_gain=True)
    verification = report["verification"]
    assert verification["passed"] and verification["gated"] and verification["synthesized"]
    assert verification["gates"]["min_cosine"] == 0.99  # the CLI's default gate
    assert verification["providers"]["cpu"]["outputs"]["logits"]["cosine"] > 0.9999
    assert isinstance(model, ir.Model)  # a path gives an onnx-ir model, as before


def test_api_gate_failure_is_the_clis_and_writes_nothing(small_model, tmp_path):
    out = tmp_path / "out" / "lr.onnx"
    with pytest.raises(GateFailed) as failed:
        onnxlr.optimize(str(small_model), output=str(out), rank=1)
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temporary files left either
    message = str(failed.value)
    assert message.startswith("verification failed: output 'logits' on cpu: cosine ")
    assert "a higher rank_ratio or energy" in message and "keep_failed writes it anyway" in message  # API keywords
    report = failed.value.report
    assert report is not None and not report.verification.passed and report.layers
    cli = onnxlr_cli("optimize", str(small_model), str(out), "--rank", "1", "--no-speed-check")
    assert cli.returncode == 1 and not out.exists()
    assert f"onnxlr: error: {failed.value.cli_message()}" in cli.stderr  # the very sentence, flags for keywords


def test_api_opt_outs_and_keep_failed(small_model, tmp_path):
    _, report = onnxlr.optimize(str(small_model), rank=1, verify=False)
    assert "verification" not in report
    out = tmp_path / "kept.onnx"
    model, report = onnxlr.optimize(str(small_model), output=str(out), rank=1, keep_failed=True)
    assert out.exists() and report["output"] == str(out) and not report["verification"]["passed"]
    _, report = onnxlr.optimize(str(small_model), rank=1, no_gate=True)
    assert report["verification"]["passed"] and not report["verification"]["gated"]


def test_api_output_is_byte_identical_to_the_clis(small_model, tmp_path):
    api_out, cli_out = tmp_path / "api.onnx", tmp_path / "cli.onnx"
    onnxlr.optimize(str(small_model), output=str(api_out), rank_ratio=0.5, min_cosine=-1)
    cli = onnxlr_cli("optimize", str(small_model), str(cli_out), "--rank-ratio", "0.5", "--min-cosine", "-1",
                     "--no-speed-check")
    assert cli.returncode == 0, cli.stderr
    assert hashlib.sha256(api_out.read_bytes()).digest() == hashlib.sha256(cli_out.read_bytes()).digest()


@pytest.mark.parametrize(("keywords", "named"), [({"samples": 0}, "samples"), ({"batch_size": -1}, "batch_size"),
                                                 ({"min_cosine": 2.0}, "min_cosine"), ({"atol": -1.0}, "atol")])
def test_api_names_a_bad_verification_keyword(small_model, keywords, named):
    with pytest.raises(OnnxlrError, match=f"^{named} must be"):
        onnxlr.optimize(str(small_model), **keywords)


@pytest.mark.slow
def test_minilm_at_quarter_rank_fails_the_same_gate_in_the_api_as_in_the_cli(tmp_path):
    path = models.build("minilm") / "model.onnx"
    out = tmp_path / "minilm-lr.onnx"
    cli = subprocess.run([sys.executable, "-m", "onnxlr", "optimize", str(path), str(out), "--rank-ratio", "0.25",
                          "--no-speed-check"], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 1 and not out.exists()
    with pytest.raises(GateFailed) as failed:
        onnxlr.optimize(str(path), rank_ratio=0.25)
    assert f"onnxlr: error: {failed.value.cli_message()}" in cli.stderr
    figures = failed.value.report.verification.providers["cpu"]["outputs"]["embedding"]
    assert figures["cosine"] < 0.99
    # A setting that passes (the user's own, looser gate) returns the same figures in the report.
    model, report = onnxlr.optimize(str(path), rank_ratio=0.25, min_cosine=0.3)
    passed = report["verification"]
    assert passed["passed"] and passed["gates"]["min_cosine"] == 0.3
    assert passed["providers"]["cpu"]["outputs"]["embedding"]["cosine"] == pytest.approx(figures["cosine"], abs=1e-6)
    assert report["totals"]["bytes_after"] < report["totals"]["bytes_before"]


def test_api_verifies_an_in_memory_model_and_leaves_it_unchanged(small_model):
    proto = onnx.load(small_model)
    before = proto.SerializeToString()
    model, report = onnxlr.optimize(proto, rank_ratio=1.0, allow_no_gain=True)
    assert isinstance(model, onnx.ModelProto) and report["verification"]["passed"]
    assert proto.SerializeToString() == before  # the caller's object is never modified
    assert "input" not in report  # an in-memory model has no path to report


def test_api_verifies_a_model_with_external_data_without_writing_beside_it(ext_model):
    files_before = sorted(p.name for p in ext_model.parent.iterdir())
    model, report = onnxlr.optimize(str(ext_model), rank_ratio=1.0, allow_no_gain=True)
    assert report["verification"]["passed"]
    assert sorted(p.name for p in ext_model.parent.iterdir()) == files_before  # the temporary copy went elsewhere
    out = ext_model.parent.parent / "out" / "lr.onnx"
    onnxlr.save(model, out)  # the returned model still reads its weights: it saves whole
    assert onnx.load(out).graph.initializer
