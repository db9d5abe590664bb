"""OCR text-line recognizer: onnxlr's --objective latency against the size objective and onnxruntime's quantizers.

    python scripts/bench_ocr.py --json out/bench-ocr.json
    python scripts/bench_ocr.py --targets 0.99 0.995 --threads 1 --batch 16

On the ocr-crnn reference (`python -m models build ocr-crnn`), in one run:
  original                  the model as built
  latency C / size C        onnxlr optimize --target-cosine C --calibration calib.npz, the held-out search set as
                            --inputs, with --objective latency or size (the default methods)
  ort static int8           onnxruntime's quantize_static: QDQ, per-channel, MinMax, on the same 256 calibration images;
                            and the same with the stem conv (the raw image's, the sensitive one) kept in float
  ort dynamic int8          onnxruntime's quantize_dynamic, per-channel
Columns: greedy-CTC character and line accuracy on the held-out lines the search never saw (eval.npz minus its
first --search lines), file bytes, and the end-to-end CPU speedup over the original (interleaved A/B runs in this
process, median of per-run ratios with p10-p90, --threads, batch --batch of held-out images), plus onnxlr's own
confirmation figure for the latency rows.
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
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxlr  # noqa: E402
from onnxlr.model_io.io import file_bytes  # noqa: E402
from onnxlr.timing import bench  # noqa: E402
from scripts.ocr_accuracy import accuracy  # noqa: E402

FOLDER = ROOT / ".cache" / "models" / "ocr-crnn"


def quantize_static(source: Path, target: Path, calibration: np.ndarray, exclude: tuple[str, ...] = ()) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude))


def quantize_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.99], help="--target-cosine values.")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (planning and timing).")
    parser.add_argument("--batch", type=int, default=16, help="Images per timed run.")
    parser.add_argument("--search", type=int, default=128, help="Held-out lines the target search measures on.")
    parser.add_argument("--runs", type=int, default=100, help="Interleaved timed runs per comparison.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (FOLDER / "model.onnx").exists():
        sys.exit("build the model first: python -m models build ocr-crnn")
    evaluation = dict(np.load(FOLDER / "eval.npz"))
    calibration = np.load(FOLDER / "calib.npz")["input"]
    search = {"input": evaluation["input"][: args.search]}
    test = {key: value[args.search:] for key, value in evaluation.items()}
    timed = {"input": test["input"][: args.batch]}
    source = FOLDER / "model.onnx"
    rows = []

    def row(label: str, path: Path, extra: dict | None = None) -> None:
        characters, lines = accuracy(path, test)
        entry = {"row": label, "characters": characters, "lines": lines, "bytes": file_bytes(path), **(extra or {})}
        if path != source:
            timing = bench.benchmark([str(source), str(path)], timed, "cpu", threads=args.threads, runs=args.runs,
                                     warmup=5)["speedup"]
            entry.update(speedup=timing["median"], speedup_p10=timing["p10"], speedup_p90=timing["p90"])
        print(json.dumps(entry), flush=True)
        rows.append(entry)

    row("original", source)
    with tempfile.TemporaryDirectory(prefix="onnxlr-ocr-") as folder:
        work = Path(folder)
        for target in args.targets:
            for objective in ("latency", "size"):
                started = time.perf_counter()
                model, report = onnxlr.optimize(str(source), calibration=str(FOLDER / "calib.npz"), heldout=[search],
                                                target_cosine=target, objective=objective,
                                                latency_threads=args.threads,
                                                input_shapes={"input": timed["input"].shape}, verify=False)
                path = work / f"{objective}-{target}.onnx"
                ir.save(model, path)
                extra = {"optimize_s": round(time.perf_counter() - started, 1),
                         "params_kept": report["totals"]["params_after"] / report["totals"]["params_before"],
                         "factorized": report["totals"]["factorized"]}
                confirmation = (report.get("latency") or {}).get("end_to_end")
                if confirmation:
                    extra.update(confirmed_speedup=confirmation["speed"]["speedup"],
                                 put_back=len(confirmation["reverted"]))
                row(f"onnxlr {objective} cos {target}", path, extra)
        quantize_static(source, work / "static.onnx", calibration)
        row("ort static int8 (QDQ, per-channel)", work / "static.onnx")
        # What a user finds next: the stem conv (one input channel, the raw image) is the sensitive one.
        stem = next(node.name for node in onnx.load(source).graph.node if node.op_type == "Conv")
        quantize_static(source, work / "static-stem.onnx", calibration, exclude=(stem,))
        row("ort static int8, stem conv kept float", work / "static-stem.onnx")
        quantize_dynamic(source, work / "dynamic.onnx")
        row("ort dynamic int8 (per-channel)", work / "dynamic.onnx")
    print("| row | char acc | line acc | bytes | speedup (p10-p90) |")
    print("|---|---|---|---|---|")
    for entry in rows:
        speed = (f"{entry['speedup']:.2f}x ({entry['speedup_p10']:.2f}-{entry['speedup_p90']:.2f})"
                 if "speedup" in entry else "1.00x")
        print(f"| {entry['row']} | {entry['characters']:.4f} | {entry['lines']:.4f} | {entry['bytes'] / 1e6:.2f} MB "
              f"| {speed} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
