"""The same input and settings give byte-identical output (README): model, external data and report.

Each run is its own process with its own PYTHONHASHSEED, so set and dict orders that depend on string
hashing would show; the two runs of a case go in parallel to keep the test short.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import ONNXLR, init, make_model, tensor_input
from onnx import helper

# Keys that may differ between two runs of the same settings: where the output went, and any timing.
VOLATILE = {"output", "time", "seconds", "elapsed", "duration", "started", "finished", "timestamp",
            "speed"}  # "speed": a measured time (the speed check), never the same twice


def _model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["img", "K", "kb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "W2"], ["logits"], name="fc2")]
    inits = [init("K", rng.standard_normal((16, 4, 3, 3)).astype(np.float32) / 6),
             init("kb", rng.standard_normal(16).astype(np.float32)),
             init("W1", rng.standard_normal((48, 16 * 6 * 6)).astype(np.float32) / 24),
             init("b1", rng.standard_normal(48).astype(np.float32)),
             init("W2", rng.standard_normal((48, 10)).astype(np.float32) / 7)]
    model = make_model(nodes, [tensor_input("img", ["batch", 4, 6, 6])], [tensor_input("logits", ["batch", 10])],
                       inits)
    onnx.save(model, path)
    rng = np.random.default_rng(1)
    np.savez(path.parent / "calib.npz", img=rng.standard_normal((24, 4, 6, 6)).astype(np.float32))
    return path


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


CASES = {
    "plain-external-data": ["--rank-ratio", "0.5", "--external-data"],
    "calibration": ["--rank-ratio", "0.5", "--calibration", "{in}/calib.npz"],
    "calibration-param-budget": ["--param-budget", "0.6", "--calibration", "{in}/calib.npz",
                                 "--calibration-samples", "16", "--no-external-data"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_runs_give_identical_files(tmp_path, case):
    (tmp_path / "in").mkdir()
    source = _model(tmp_path / "in" / "model.onnx")
    args = [arg.format(**{"in": source.parent}) for arg in CASES[case]]
    runs = []
    for index, seed in enumerate(("1", "2")):
        out = tmp_path / f"run{index}"
        command = [*ONNXLR, "optimize", str(source), str(out / "model-lr.onnx"), "--report", str(out / "report.json"),
                   "-q", "--no-gate", *args]  # determinism, not quality: the gate stays out of it
        env = {**os.environ, "PYTHONHASHSEED": seed}
        runs.append((out, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)))
    for _out, process in runs:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    (first, _), (second, _) = runs
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    expected = {"model-lr.onnx", "report.json"} | ({"model-lr.onnx.data"} if "--external-data" in args else set())
    assert set(names) == expected
    for name in names:
        if name == "report.json":
            continue
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    reports = [_strip(json.loads((out / "report.json").read_text())) for out in (first, second)]
    assert reports[0] == reports[1]
    assert any(layer["status"] == "factorized" for layer in reports[0]["layers"])
    if "--calibration" in args:
        assert "whitened" in {layer["method"] for layer in reports[0]["layers"] if layer["status"] == "factorized"}
