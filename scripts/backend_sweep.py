"""Run `onnxlr optimize M OUT --rank-ratio 0.5` (default flags otherwise) on ONNX's own backend-suite models.

What it is for: a new user's first run on models onnxlr's tests did not write. ONNX ships its
backend test models inside the `onnx` package (light model-zoo models, PyTorch-converted and
PyTorch-operator models, simple graphs); every one with a Conv, Gemm or MatMul node is optimized
with the default flags, and the exit code must be 0 (written) or 1 (a named gate failure), never 2
(refused) or 3 (internal error). Prints one row per model and a summary; `--json` writes them.

    python scripts/backend_sweep.py                       # all suites
    python scripts/backend_sweep.py --suites light --json out/backend-sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

SUITES = ("light", "pytorch-converted", "pytorch-operator", "simple")
FACTORIZABLE = {"Conv", "Gemm", "MatMul"}


def suite_models(suites: list[str]) -> list[Path]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    models = []
    for suite in suites:
        for path in sorted((root / suite).glob("*/model.onnx")):
            graph = onnx.load(str(path), load_external_data=False).graph
            if any(node.op_type in FACTORIZABLE for node in graph.node):
                models.append(path)
    return models


def optimize(path: Path, extra: list[str], timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="onnxlr-sweep-") as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "onnxlr", "optimize", str(path), str(Path(folder) / "out.onnx"),
                   "--rank-ratio", "0.5", "--report", str(report), "-q", *extra]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=folder)
        except subprocess.TimeoutExpired:
            return {"rc": "timeout", "factorized": None, "message": f"over {timeout} s"}
        factorized = json.loads(report.read_text())["totals"]["factorized"] if report.exists() else None
        lines = done.stderr.strip().splitlines()
        return {"rc": done.returncode, "factorized": factorized, "message": lines[-1][:200] if lines else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("extra", nargs="*", help="extra optimize flags (after --)")
    args = parser.parse_args()
    rows = {}
    for path in suite_models(args.suites):
        name = f"{path.parent.parent.name}/{path.parent.name}"
        rows[name] = optimize(path, args.extra, args.timeout)
        row = rows[name]
        print(f"{name:<60} rc {row['rc']!s:<7} factorized {row['factorized']!s:<5} {row['message']}", flush=True)
    codes: dict[str, int] = {}
    for row in rows.values():
        codes[str(row["rc"])] = codes.get(str(row["rc"]), 0) + 1
    print(f"{len(rows)} models: " + ", ".join(f"exit {code}: {count}" for code, count in sorted(codes.items())))
    if args.json:
        os.makedirs(Path(args.json).parent, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    return 0 if set(codes) <= {"0", "1"} else 1


if __name__ == "__main__":
    sys.exit(main())
