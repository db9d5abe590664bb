"""--objective latency on conv architectures onnxlr did not write: never a slower model, end to end.

    python scripts/bench_zoo_latency.py --json out/zoo-latency.json
    python scripts/bench_zoo_latency.py --models squeezenet resnet50 --rank-ratio 0.25 --threads 2

The ONNX package ships the model zoo's classic vision models (Caffe2 exports: IR 3, opset 9, every weight listed
as a graph input) as "light" files whose weights are generated at run time by ConstantOfShape. This script makes
each a normal model: every generated weight becomes an initializer of He-scaled Gaussian values (seeded), so the
architecture, layouts and shapes are the real ones, and the weights are random (fine for speed, meaningless for
fidelity: no accuracy is reported). Then, per model, in one process:
  onnxlr optimize MODEL OUT --objective latency --rank-ratio R --threads T --no-gate
and an independent end-to-end comparison of OUT against MODEL (interleaved A/B runs, median of per-run ratios,
p10-p90, optimization level all) on a 1x3x224x224 input. Rows: layers factorized / put back, onnxlr's own
confirmed speedup, the independent speedup. The target: no row below 1.0x.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxlr  # noqa: E402
from onnxlr.timing import bench  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = ("squeezenet", "shufflenet", "inception_v1", "inception_v2", "resnet50", "densenet121")


def materialized(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model with its ConstantOfShape weights as seeded He-scaled initializers."""
    model = onnx.load(LIGHT / f"light_{name}.onnx")
    rng = np.random.default_rng(seed)
    shapes = {}
    kept = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape":
            shape_tensor = next(t for t in model.graph.initializer if t.name == node.input[0])
            shapes[node.output[0]] = tuple(int(d) for d in numpy_helper.to_array(shape_tensor))
        else:
            kept.append(node)
    used = {name for node in kept for name in node.input}
    initializers = [t for t in model.graph.initializer if t.name in used]
    for output, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        values = rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
        if len(shape) == 1:  # biases, batch-norm statistics: positive scale/variance, small shifts
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        initializers.append(numpy_helper.from_array(values.astype(np.float32), output))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    names = {t.name for t in initializers}
    # The data input stays; the weights are initializers only (IR 4: not inputs a caller may override).
    inputs = [value for value in model.graph.input if value.name in used and value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=40, help="Interleaved timed runs of the independent check.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxlr-zoo-") as folder:
        for name in args.models:
            source = Path(folder) / f"{name}.onnx"
            model = materialized(name)
            onnx.save(model, source)
            feeds = {model.graph.input[0].name: np.random.default_rng(1).random((1, 3, 224, 224), np.float32)}
            started = time.perf_counter()
            result, report = onnxlr.optimize(str(source), rank_ratio=args.rank_ratio, objective="latency",
                                             latency_threads=args.threads,
                                             input_shapes={name: array.shape for name, array in feeds.items()}, verify=False)
            seconds = time.perf_counter() - started
            output = Path(folder) / f"{name}-lr.onnx"
            onnxlr.save(result, output)
            check = bench.benchmark([str(source), str(output)], feeds, "cpu", threads=args.threads, runs=args.runs,
                                    warmup=3)["speedup"]
            end = (report.get("latency") or {}).get("end_to_end")
            row = {"model": name, "targets": len(report["layers"]), "factorized": report["totals"]["factorized"],
                   "put_back": len(end["reverted"]) if end else 0,
                   "confirmed_speedup": end["speed"]["speedup"] if end else None,
                   "speedup": check["median"], "speedup_p10": check["p10"], "speedup_p90": check["p90"],
                   "optimize_s": round(seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("| model | layers factorized / targets (put back) | onnxlr confirmed | independent (p10-p90) |")
    print("|---|---|---|---|")
    for row in rows:
        confirmed = f"{row['confirmed_speedup']:.2f}x" if row["confirmed_speedup"] else "- (nothing planned)"
        print(f"| {row['model']} | {row['factorized']} / {row['targets']} ({row['put_back']}) | {confirmed} | "
              f"{row['speedup']:.2f}x ({row['speedup_p10']:.2f}-{row['speedup_p90']:.2f}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "rank_ratio": args.rank_ratio, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
