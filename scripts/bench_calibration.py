"""Quality of plain vs data-aware factorization against the fraction of the model kept, with CPU speedup.

    python scripts/bench_calibration.py minilm --json out/bench-minilm.json
    python scripts/bench_calibration.py digits --json out/bench-digits.json

minilm (all-MiniLM-L6-v2, MatMul weights): for each fraction F of the factorizable parameters kept,
the mean cosine of the held-out sentence embeddings to the original's and the 10-nearest-neighbour
overlap (of each held-out sentence's 10 neighbours among the held-out set, how many are kept).
digits (digits-cnn, Conv and Gemm weights): held-out accuracy for each fraction F of their MACs kept.

Methods, each at the same F:
  plain       plain SVD, every layer at the same fraction (--param-ratio F; digits: MACs ratio)
  whitened    activation-whitened SVD, the same uniform ranks
  full        whitened + global allocation by measured sensitivity + --compensate
              (minilm: --param-budget F; digits: --mac-budget F)
  budget      whitened + the same global allocation, without --compensate
  joint       budget with joint pairs (the default with calibration data): coupled MLP pairs and attention
              V·O and Q·Kᵀ head pairs compete in the allocation, keeping k of their inner neurons (head
              dimensions), where that loses less output error than the pair's per-matrix plan at the same cost
  target      --target-cosine C (default 0.99) with per-matrix factorization only, searched on the first
              half of the held-out set; target-joint: the same with joint pairs. `kept` shows C
  int8        onnxruntime's dynamic per-channel INT8 quantization alone (quantize_dynamic), once: the
              one-line alternative every onnxlr figure is read against
The speedup is onnxruntime's CPU latency of the original over the candidate, interleaved A/B runs in
this process (median of pairwise ratios; --threads, default 2), on one batch of held-out inputs
(minilm: 32 sentences x 64 tokens; digits: 32 images).
Models are built with `python -m models build minilm|digits-cnn`; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxlr  # noqa: E402
from onnxlr.model_io.inputs import input_specs, load_inputs  # noqa: E402
from onnxlr.timing import bench  # noqa: E402

METHODS = ("plain", "whitened", "full", "budget", "joint", "target", "target-joint", "int8")
DEFAULT_METHODS = ("plain", "whitened", "full", "int8")
DEFAULT_FRACTIONS = (1.0, 0.8, 0.7, 0.6, 0.5)  # the grid; add lower ones with --fractions
THREADS = 2  # onnxruntime intra-op threads for the speedups (--threads)


def run_model(model: ir.Model | Path, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else ir.to_proto(model).SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    count = len(next(iter(feeds.values())))
    parts = [session.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, count, batch)]
    return np.concatenate(parts)


def neighbour_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    a, b = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    dot = np.sum(reference * candidate, axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return float(np.mean(dot / norms))


def settings_for(name: str, method: str, fraction: float, base: dict) -> dict:
    budget = "param_budget" if name == "minilm" else "mac_budget"  # digits: its figure of merit is MACs
    svd = {**base, "methods": ("svd",)}  # per-matrix only (joint pairs are the default with calibration)
    joint = {**base, "methods": ("svd", "joint")}
    if method == "full":
        return {**svd, budget: fraction, "compensate": True}
    if method == "budget":
        return {**svd, budget: fraction}
    if method == "joint":
        return {**joint, budget: fraction}
    if method.startswith("target"):
        return {**(joint if method == "target-joint" else svd), "target_cosine": fraction}
    return {**svd, "param_ratio": fraction}  # a conv pair's MACs scale with its parameters


def speedup(original: Path, candidate: ir.Model, feeds: dict[str, np.ndarray], runs: int) -> float:
    data = ir.to_proto(candidate).SerializeToString()
    result = bench.benchmark([str(original), data], feeds, "cpu", threads=THREADS, runs=runs, warmup=5)
    return result["speedup"]["median"]


def evaluate(name: str, fractions: list[float], methods: list[str], runs: int, target_cosine: float = 0.99
             ) -> list[dict]:
    folder = ROOT / ".cache" / "models" / ("minilm" if name == "minilm" else "digits-cnn")
    model_path = folder / "model.onnx"
    loaded = onnxlr.load(model_path)
    specs = input_specs(loaded.model)
    eval_feeds = load_inputs(folder / "eval.npz", specs)
    calib = folder / "calib.npz"
    if name == "minilm":
        base = {"ops": ("MatMul",)}
        bench_feeds = {k: v[:32] for k, v in eval_feeds.items()}
    else:
        base = {"ops": ("Conv", "Gemm"), "min_params": 4096}
        bench_feeds = {k: v[:32] for k, v in eval_feeds.items()}
    labels = np.load(folder / "eval.npz")["labels"] if name == "digits" else None
    reference = run_model(model_path, eval_feeds)
    rows = []
    if "int8" in methods:
        rows.append(int8_row(name, model_path, eval_feeds, bench_feeds, reference, labels, runs))
    count = len(next(iter(eval_feeds.values())))
    search_feeds = [{k: v[i:i + 16] for k, v in eval_feeds.items()} for i in range(0, count // 2, 16)]
    grid = [(fraction, m) for fraction in fractions for m in methods if m != "int8" and not m.startswith("target")]
    grid += [(target_cosine, m) for m in methods if m.startswith("target")]
    for fraction, method in grid:
        settings = settings_for(name, method, fraction, base)
        start = time.perf_counter()
        calibration = None if method == "plain" else str(calib)
        heldout = search_feeds if method.startswith("target") else None
        try:
            model, report = onnxlr.optimize(str(model_path), calibration=calibration, heldout=heldout, **settings, verify=False)
        except onnxlr.OnnxlrError as exc:
            print(f"{name} {method} {fraction}: {exc}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - start
        output = run_model(model, eval_feeds)
        totals = report["totals"]
        layers = [row for row in report["layers"] if row["params_before"] is not None and row["weight"]]
        kept_params = sum(r["params_after"] for r in layers) / max(sum(r["params_before"] for r in layers), 1)
        row = {
            "model": name, "method": method, "fraction": fraction, "seconds": round(seconds, 1),
            "kept_params": kept_params, "kept_macs": totals["macs_after"] / max(totals["macs_before"], 1),
            "kept_bytes": totals["bytes_after"] / max(totals["bytes_before"], 1),
            "factorized": totals["factorized"],
            "speedup": speedup(model_path, model, bench_feeds, runs),
        }
        if name == "minilm":
            row["mean_cosine"] = mean_cosine(reference, output)
            row["knn10_overlap"] = neighbour_overlap(reference, output)
            if heldout is not None:  # the half the search did not see
                row["mean_cosine_unsearched"] = mean_cosine(reference[count // 2:], output[count // 2:])
        else:
            row["accuracy"] = float(np.mean(np.argmax(output, 1) == labels))
            row["accuracy_original"] = float(np.mean(np.argmax(reference, 1) == labels))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def int8_row(name: str, model_path: Path, eval_feeds: dict, bench_feeds: dict, reference: np.ndarray,
             labels: np.ndarray | None, runs: int) -> dict:
    """onnxruntime's dynamic per-channel INT8 quantization of the original, measured like the others."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        quantized = Path(folder) / "int8.onnx"
        quantize_dynamic(str(model_path), str(quantized), per_channel=True, weight_type=QuantType.QInt8)
        output = run_model(quantized, eval_feeds)
        result = bench.benchmark([str(model_path), str(quantized)], bench_feeds, "cpu", threads=THREADS, runs=runs,
                                 warmup=5)
        size = quantized.stat().st_size / model_path.stat().st_size  # the file: weights and graph
    row = {"model": name, "method": "int8", "fraction": "-", "seconds": 0.0, "kept_params": 1.0,
           "kept_macs": 1.0, "kept_bytes": size, "factorized": 0, "speedup": result["speedup"]["median"]}
    if name == "minilm":
        row["mean_cosine"] = mean_cosine(reference, output)
        row["knn10_overlap"] = neighbour_overlap(reference, output)
    else:
        row["accuracy"] = float(np.mean(np.argmax(output, 1) == labels))
        row["accuracy_original"] = float(np.mean(np.argmax(reference, 1) == labels))
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    if rows[0]["model"] == "minilm":
        head = ("| kept | method | params kept | MACs kept | weight bytes kept | mean cosine | 10-NN overlap | "
                "CPU speedup |")
        line = ("| {fraction} | {method} | {kept_params:.3f} | {kept_macs:.3f} | {kept_bytes:.3f} | {mean_cosine:.4f} | "
                "{knn10_overlap:.3f} | {speedup:.2f}x |")
    else:
        head = ("| kept | method | params kept | MACs kept | weight bytes kept | accuracy (original "
                "{accuracy_original:.4f}) | CPU speedup |")
        line = ("| {fraction} | {method} | {kept_params:.3f} | {kept_macs:.3f} | {kept_bytes:.3f} | {accuracy:.4f} | "
                "{speedup:.2f}x |")
    sep = "|" + "---|" * (head.count("|") - 1)
    return "\n".join([head.format(**rows[0]), sep, *(line.format(**row) for row in rows)])


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["minilm", "digits"])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model for the speedup")
    parser.add_argument("--target-cosine", type=float, default=0.99, help="the goal of the target methods")
    parser.add_argument("--threads", type=int, default=THREADS, help="onnxruntime threads for the speedups")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if any(not (0 < f <= 1) or math.isnan(f) for f in args.fractions):
        parser.error("fractions must be in (0, 1]")
    THREADS = args.threads
    rows = evaluate(args.model, args.fractions, args.methods, args.runs, args.target_cosine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
