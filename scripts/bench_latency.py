"""--objective latency against --objective size at the same budget, with INT8 alone beside them, in one run.

    python scripts/bench_latency.py digits --fractions 0.5 0.3 --json out/latency-digits.json
    python scripts/bench_latency.py minilm --fractions 0.7 0.5 --json out/latency-minilm.json

Rows, each with calibration data:
  size F       --param-budget F (digits: --mac-budget F): ranks by parameters (MACs) and measured sensitivity
  latency F    the same budget with --objective latency: only ranks measured faster than their original node
               (timed at the benchmark's batch, --threads) are allocated
  ... (svd)    the same with --methods svd (every layer its own factor pair; without it, coupled pairs may be
               narrowed jointly instead, the default with calibration data)
  int8         onnxruntime's quantize_dynamic, per-channel INT8, alone
Columns: fidelity on held-out data (minilm: mean cosine of the sentence embeddings; digits: accuracy), the
end-to-end CPU speedup over the original (interleaved A/B runs in this process, median of per-run ratios,
--threads, batch 32 x 64 tokens or 32 images), the per-layer profile (`onnxlr bench --profile`: how many
factorized layers run slower than their original, and the slowest one's ratio), the optimize wall time, and
for latency rows the seconds the timing took (cache emptied first, so it is the cold cost). The cache of
measured times lives in a temporary folder here, never the user's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxlr  # noqa: E402
from onnxlr.timing import bench  # noqa: E402
from scripts.bench_calibration import run_model  # noqa: E402
from scripts.bench_frontier import ort_int8, setup  # noqa: E402

THREADS = 2


def fidelity(case: dict, reference: np.ndarray, path: Path) -> float:
    output = run_model(path, case["eval"])
    if case["labels"] is not None:
        return float(np.mean(np.argmax(output, 1) == case["labels"]))
    dot = np.sum(reference * output, axis=1)
    return float(np.mean(dot / (np.linalg.norm(reference, axis=1) * np.linalg.norm(output, axis=1))))


def measure(case: dict, reference: np.ndarray, label: str, path: Path, runs: int, extra: dict) -> dict:
    timing = bench.benchmark([str(case["path"]), str(path)], case["bench"], "cpu", threads=THREADS, runs=runs,
                             warmup=5)
    row = {"model": case["name"], "row": label, "fidelity": fidelity(case, reference, path),
           "speedup": timing["speedup"]["median"], "speedup_p10": timing["speedup"]["p10"],
           "speedup_p90": timing["speedup"]["p90"], **extra}
    if label != "int8":
        layers = bench.profile_layers(str(case["path"]), str(path), case["bench"], "cpu", threads=THREADS,
                                      runs=max(10, runs // 2))["layers"]
        ratios = [layer["speedup"] for layer in layers if layer["speedup"] is not None]
        row.update(profiled_layers=len(ratios), slower_layers=sum(r < 1 for r in ratios),
                   slowest_layer=min(ratios) if ratios else None)
    print(json.dumps(row), flush=True)
    return row


def optimize(case: dict, fraction: float, objective: str, methods: str, output: Path) -> dict:
    started = time.perf_counter()
    shapes = {name: array.shape for name, array in case["bench"].items()}
    model, report = onnxlr.optimize(str(case["path"]), calibration=case["calibration"], objective=objective,
                                    latency_threads=THREADS, input_shapes=shapes, methods=tuple(methods.split(",")),
                                    **{case["budget"]: fraction}, **case["settings"], verify=False)
    ir.save(model, output)
    extra = {"optimize_s": round(time.perf_counter() - started, 1),
             "params_kept": report["totals"]["params_after"] / report["totals"]["params_before"],
             "factorized": report["totals"]["factorized"]}
    if "latency" in report:
        plan = report["latency"]
        extra.update(timing_s=plan["timing_s"], timed_models=plan["timed_models"],
                     planned_saving=plan["planned_saving"],
                     not_faster=sum(row["reason_code"] == "not_faster" for row in report["layers"]))
    return extra


def run(name: str, fractions: list[float], runs: int, methods: list[str]) -> list[dict]:
    case = setup(name, tables=False)
    reference = run_model(case["path"], case["eval"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxlr-latency-") as folder:
        work = Path(folder)
        os.environ["ONNXLR_CACHE_DIR"] = str(work / "cache")  # cold: the timing cost is counted in full
        ort_int8(case["path"], work / "int8.onnx", per_channel=True)
        rows.append(measure(case, reference, "int8", work / "int8.onnx", runs, {}))
        for method in methods:
            suffix = " (svd)" if method == "svd" else ""
            for fraction in fractions:
                for objective in ("size", "latency"):
                    path = work / f"{objective}-{fraction}-{method}.onnx"
                    extra = optimize(case, fraction, objective, method, path)
                    rows.append(measure(case, reference, f"{objective} {fraction}{suffix}", path, runs, extra))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | row | fidelity | speedup (p10-p90) | factorized layers slower / profiled (slowest) | "
             "params kept | optimize s | timing s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        slower = (f"{row['slower_layers']} / {row['profiled_layers']} ({row['slowest_layer']:.2f}x)"
                  if row.get("slowest_layer") is not None else "-")
        lines.append(f"| {row['model']} | {row['row']} | {row['fidelity']:.4f} | {row['speedup']:.2f}x "
                     f"({row['speedup_p10']:.2f}-{row['speedup_p90']:.2f}) | {slower} | "
                     f"{row.get('params_kept', float('nan')):.3f} | {row.get('optimize_s', '-')} | "
                     f"{row.get('timing_s', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["digits", "minilm"])
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="Budgets (default: digits 0.5 0.3 of the MACs, minilm 0.7 0.5 of the parameters).")
    parser.add_argument("--runs", type=int, default=50, help="Interleaved timed runs per comparison.")
    parser.add_argument("--methods", nargs="+", default=["svd,joint", "svd"], choices=["svd,joint", "svd"],
                        help="Methods to run each budget with (default both).")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (timing, bench).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    fractions = args.fractions or ([0.5, 0.3] if args.model == "digits" else [0.7, 0.5])
    global THREADS
    THREADS = args.threads
    rows = run(args.model, fractions, args.runs, args.methods)
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
