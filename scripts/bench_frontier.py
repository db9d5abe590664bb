"""The size / speed / fidelity frontier against onnxruntime's quantizer alone, in one run.

    python scripts/bench_frontier.py minilm --json out/frontier-minilm.json --plot docs/frontier-minilm.png
    python scripts/bench_frontier.py digits --json out/frontier-digits.json --plot docs/frontier-digits.png

Rows, every one measured the same way in this process:
  original          fp32, as built by `python -m models build minilm|digits-cnn`
  ort-int8          onnxruntime's quantize_dynamic alone, its default (per-tensor INT8 weights)
  ort-int8-pc       the same, per-channel (the strongest one-line alternative)
  ort-int4 + int8 tables  (minilm) 4-bit weight-only MatMulNBits (block 32) and INT8 embedding tables
  ort-int8 + int4 table   (minilm) dynamic INT8 MatMuls (per channel) and a 4-bit embedding table
                    (GatherBlockQuantized, block 32; the model converted to opset 21 first)
  ort-int4 + int4 table   (minilm) 4-bit MatMuls and table (MatMulNBits / GatherBlockQuantized, block 32,
                    symmetric): the smallest onnxruntime configuration
  int4/B + lqer R DTYPE [measured]  (minilm) onnxlr --quantize int4 --quantize-block B with --correction-rank R
                    --correction-dtype DTYPE (--correction-allocation measured) and no layer factorized: each 4-bit
                    MatMul corrected by a whitened pair (--corrections RANK:DTYPE[:BLOCK[:ALLOCATION]], block 32 and
                    uniform ranks by default)
  auto C[/B]        (minilm) onnxlr --quantize auto --target-cosine C (--quantize-block B, 32 by default): each
                    MatMul float, 8-bit, 4-bit or 4-bit + a correction, each table float or 4-bit, planned for the
                    fewest bytes that keep cosine C on the search half of the held-out data (--auto-targets)
  onnxlr F          onnxlr alone with calibration: --param-budget F (digits: --mac-budget F), joint pairs on;
                    minilm: --ops MatMul,Gather (the embedding tables too; --no-tables: MatMul only)
  onnxlr F + MODE   that model quantized by --quantize MODE (int8, int8-static, fp16): the same call the
                    pipeline makes after the rewrite (onnxlr.factorize.quantize.quantize)
  target C + int8   --target-cosine C --quantize int8 (minilm only): the search pays for both errors
Columns: the file's bytes (model and external data, as written), its ratio to the original and to
ort-int8-pc, onnxruntime's CPU speedup over the original (interleaved A/B, median of per-run
ratios, --threads, batch 32 x 64 tokens or 32 images), and fidelity on held-out data never used for
calibration (minilm: mean cosine of the sentence embeddings; digits: accuracy). The rows searched on the first half
of the held-out data (target, auto) also give `fidelity_unsearched`: the same measure on the second half alone. The plot puts file
size against fidelity, one point per row, labelled with the speedup.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxlr  # noqa: E402
from onnxlr.factorize import quantize  # noqa: E402
from onnxlr.model_io.inputs import input_specs, load_inputs  # noqa: E402
from onnxlr.model_io.io import file_bytes  # noqa: E402
from onnxlr.timing import bench  # noqa: E402
from scripts.bench_calibration import mean_cosine, run_model  # noqa: E402

THREADS = 2


def setup(name: str, tables: bool) -> dict:
    folder = ROOT / ".cache" / "models" / ("minilm" if name == "minilm" else "digits-cnn")
    model_path = folder / "model.onnx"
    specs = input_specs(onnxlr.load(model_path).model)
    eval_feeds = load_inputs(folder / "eval.npz", specs)
    count = len(next(iter(eval_feeds.values())))
    return {
        "name": name, "path": model_path, "calibration": str(folder / "calib.npz"), "eval": eval_feeds,
        "bench": {k: v[:32] for k, v in eval_feeds.items()},
        "search": [{k: v[i:i + 16] for k, v in eval_feeds.items()} for i in range(0, count // 2, 16)],
        "labels": np.load(folder / "eval.npz")["labels"] if name == "digits" else None,
        "settings": ({"ops": ("MatMul", "Gather") if tables else ("MatMul",)} if name == "minilm"
                     else {"ops": ("Conv", "Gemm"), "min_params": 4096}),
        "budget": "param_budget" if name == "minilm" else "mac_budget",
    }


def measure(case: dict, label: str, path: Path, reference: np.ndarray, runs: int, seconds: float = 0.0) -> dict:
    output = run_model(path, case["eval"])
    speed = 1.0 if path == case["path"] else bench.benchmark(
        [str(case["path"]), str(path)], case["bench"], "cpu", threads=THREADS, runs=runs, warmup=5)["speedup"]["median"]
    row = {"model": case["name"], "row": label, "bytes": file_bytes(path), "speedup": speed, "seconds": round(seconds, 1)}
    if case["labels"] is None:
        row["fidelity"] = mean_cosine(reference, output)
    else:
        row["fidelity"] = float(np.mean(np.argmax(output, 1) == case["labels"]))
    print(json.dumps(row), flush=True)
    return row


def unsearched(case: dict, row: dict, path: Path, reference: np.ndarray) -> dict:
    """The row with its fidelity on the second half of the held-out data alone (the search measured the first)."""
    half = len(reference) // 2
    output = run_model(path, {k: v[half:] for k, v in case["eval"].items()})
    row["fidelity_unsearched"] = mean_cosine(reference[half:], output)
    print(json.dumps({"row": row["row"], "fidelity_unsearched": row["fidelity_unsearched"]}), flush=True)
    return row


def ort_int8(source: Path, target: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, per_channel=per_channel, weight_type=QuantType.QInt8)


def ort_int4(source: Path, target: Path) -> None:
    """onnxruntime's 4-bit weight-only MatMulNBits (block 32, symmetric) for the MatMuls, then dynamic INT8 for
    the embedding tables (Gather): its smallest configuration for a transformer encoder."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(source), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    middle = target.with_name("int4-matmul.onnx")
    onnx.save(quantizer.model.model, middle)
    quantize_dynamic(middle, target, op_types_to_quantize=["Gather"], per_channel=True, weight_type=QuantType.QInt8)


def ort_table4(source: Path, target: Path, matmuls: str) -> None:
    """A 4-bit embedding table (GatherBlockQuantized, block 32, which needs opset 21: onnx's converter first) with
    dynamic per-channel INT8 MatMuls (`matmuls` int8) or 4-bit MatMulNBits ones (int4), as a user of
    onnxruntime's tools would write them."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    converted = target.with_name("opset21.onnx")
    onnx.save(quantize.at_opset_21(onnx.load(source)), converted)
    ops: tuple[str, ...] = ("Gather", "MatMul") if matmuls == "int4" else ("Gather",)
    if matmuls == "int8":
        middle = target.with_name("int8-matmul.onnx")
        quantize_dynamic(converted, middle, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        converted = middle
    quantizer = MatMulNBitsQuantizer(onnx.load(converted), bits=4, block_size=32, is_symmetric=True,
                                     op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    onnx.save(quantizer.model.model, target)


def static_batches(case: dict) -> list[dict[str, np.ndarray]]:
    """The calibration file as the pipeline reads it for int8-static: batches of 16 samples."""
    whole = dict(np.load(case["calibration"]))
    count = len(next(iter(whole.values())))
    return [{k: v[i:i + 16] for k, v in whole.items()} for i in range(0, count, 16)]


def save(model: ir.Model, path: Path) -> Path:
    ir.save(model, path)
    return path


def frontier(name: str, budgets: list[float], modes: list[str], target: float | None, runs: int,
             tables: bool, corrections: list[tuple[int, str, int, str]] = (),
             autos: list[tuple[float, int]] = ()) -> list[dict]:
    case = setup(name, tables)
    reference = run_model(case["path"], case["eval"])
    rows = [measure(case, "original", case["path"], reference, runs)]
    with tempfile.TemporaryDirectory(prefix="onnxlr-frontier-") as folder:
        work = Path(folder)
        for label, per_channel in (("ort-int8", False), ("ort-int8-pc", True)):
            ort_int8(case["path"], work / f"{label}.onnx", per_channel)
            rows.append(measure(case, label, work / f"{label}.onnx", reference, runs))
        if name != "minilm":  # static QDQ INT8 (per channel), the fast INT8 for convs on this CPU
            static = save(quantize.quantize(ir.load(case["path"]), "int8-static", static_batches(case)),
                          work / "ort-int8-static.onnx")
            rows.append(measure(case, "ort-int8-static (QDQ, per-channel)", static, reference, runs))
        if name == "minilm":
            ort_int4(case["path"], work / "ort-int4.onnx")
            rows.append(measure(case, "ort-int4 + int8 tables", work / "ort-int4.onnx", reference, runs))
            for label, matmuls in (("ort-int8 + int4 table", "int8"), ("ort-int4 + int4 table", "int4")):
                path = work / f"{label.replace(' ', '')}.onnx"
                ort_table4(case["path"], path, matmuls)
                rows.append(measure(case, label, path, reference, runs))
            for rank, dtype, block, allocation in corrections:
                start = time.perf_counter()
                model, _ = onnxlr.optimize(str(case["path"]), calibration=case["calibration"], quantize="int4",
                                           quantize_block=block, correction_rank=rank, correction_dtype=dtype,
                                           correction_allocation=allocation, min_params=1 << 40,
                                           verify=False)  # no layer factorized: the quantizer and its correction
                path = save(model, work / f"int4-{block}-lqer-{rank}-{dtype}-{allocation}.onnx")
                label = f"int4/{block} + lqer {rank} {dtype}" + (" measured" if allocation == "measured" else "")
                rows.append(measure(case, label, path, reference, runs, time.perf_counter() - start))
            for goal, block in autos:
                start = time.perf_counter()
                model, report = onnxlr.optimize(str(case["path"]), calibration=case["calibration"],
                                                heldout=case["search"], quantize="auto", target_cosine=goal,
                                                quantize_block=block, verify=False)
                path = save(model, work / f"auto-{goal}-{block}.onnx")
                row = measure(case, f"auto {goal}" + (f"/{block}" if block != 32 else ""), path, reference, runs,
                              time.perf_counter() - start)
                row["plan"] = report["quantization"]["plan"]
                rows.append(unsearched(case, row, path, reference))
        for budget in budgets:
            start = time.perf_counter()
            model, _ = onnxlr.optimize(str(case["path"]), calibration=case["calibration"],
                                       **{**case["settings"], case["budget"]: budget}, verify=False)
            seconds = time.perf_counter() - start
            path = save(model, work / f"lr-{budget}.onnx")
            rows.append(measure(case, f"onnxlr {budget}", path, reference, runs, seconds))
            for mode in modes:
                start = time.perf_counter()
                quantized = quantize.quantize(ir.load(path), mode, static_batches(case) if mode == "int8-static" else None)
                label = f"onnxlr {budget} + {mode}"
                rows.append(measure(case, label, save(quantized, work / f"lr-{budget}-{mode}.onnx"), reference, runs,
                                    seconds + time.perf_counter() - start))
        if target is not None and name == "minilm":
            start = time.perf_counter()
            model, report = onnxlr.optimize(str(case["path"]), calibration=case["calibration"], heldout=case["search"],
                                            target_cosine=target, quantize="int8", **case["settings"], verify=False)
            path = save(model, work / "target-int8.onnx")
            row = measure(case, f"target {target} + int8", path, reference, runs, time.perf_counter() - start)
            row["searched_budget"] = min((t["budget"] for t in report["calibration"]["search"]
                                          if t["cosine"] >= report["calibration"]["quantizer"]["low_rank_goal"]),
                                         default=None)
            rows.append(unsearched(case, row, path, reference))
    int8 = next(r["bytes"] for r in rows if r["row"] == "ort-int8-pc")
    for row in rows:
        row["bytes_vs_original"] = row["bytes"] / rows[0]["bytes"]
        row["bytes_vs_int8_pc"] = row["bytes"] / int8
    return rows


def markdown(rows: list[dict]) -> str:
    fidelity = "held-out mean cosine" if rows[0]["model"] == "minilm" else "held-out accuracy"
    lines = [f"| model | file | vs original | vs INT8 per-channel | CPU speedup | {fidelity} |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['row']} | {row['bytes'] / 1e6:.1f} MB | {row['bytes_vs_original']:.3f} | "
                     f"{row['bytes_vs_int8_pc']:.2f} | {row['speedup']:.2f}x | {row['fidelity']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    floor = 0.9 if rows[0]["model"] == "minilm" else 0.0  # rows below it are listed, not drawn: they squash the rest
    shown = [row for row in rows if row["fidelity"] >= floor]
    hidden = [row for row in rows if row["fidelity"] < floor]
    for index, row in enumerate(shown):
        kind = "onnxruntime alone" if row["row"].startswith("ort") else (
            "original" if row["row"] == "original" else ("onnxlr + quantizer" if "+" in row["row"] else "onnxlr alone"))
        marker = {"original": "s", "onnxruntime alone": "D", "onnxlr alone": "o", "onnxlr + quantizer": "^"}[kind]
        color = {"original": "black", "onnxruntime alone": "tab:red", "onnxlr alone": "tab:blue",
                 "onnxlr + quantizer": "tab:green"}[kind]
        axes.scatter(row["bytes"] / 1e6, row["fidelity"], marker=marker, color=color, label=kind)
        axes.annotate(f"{row['row']} ({row['speedup']:.2f}x)", (row["bytes"] / 1e6, row["fidelity"]), fontsize=7,
                      xytext=(6 if index % 2 else -6, -3), ha="left" if index % 2 else "right",
                      textcoords="offset points")  # alternately right and left of the point: fewer overlaps
    if hidden:
        axes.text(0.99, 0.02, "off the chart: " + "; ".join(f"{r['row']} {r['fidelity']:.3f}" for r in hidden),
                  transform=axes.transAxes, ha="right", va="bottom", fontsize=7, color="dimgray")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), loc="center right")
    axes.margins(x=0.2)  # room for the labels left of the smallest files
    axes.set_xlabel("file size (MB)")
    axes.set_ylabel("held-out mean cosine" if rows[0]["model"] == "minilm" else "held-out accuracy")
    axes.set_title(f"{rows[0]['model']}: size / fidelity frontier (labels: CPU speedup, {THREADS} threads)")
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["minilm", "digits"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6])
    single = [mode for mode in quantize.MODES if mode != "auto"]  # auto plans the original: its own rows
    parser.add_argument("--modes", nargs="+", choices=single, default=single)
    parser.add_argument("--target-cosine", type=float, default=0.98, help="minilm: the target + int8 row's goal")
    parser.add_argument("--no-target", action="store_true", help="leave out the target + int8 row")
    parser.add_argument("--no-tables", action="store_true",
                        help="minilm: MatMul weights only (default: the embedding tables too, --ops MatMul,Gather)")
    parser.add_argument("--corrections", nargs="*",
                        default=["0:int8:64", "16:int8:64", "24:int8:64", "24:int8:64:measured", "0:int8:32",
                                 "32:int8:32", "27:int8:32:measured", "32:float16:32", "64:int8:32"],
                        metavar="RANK:DTYPE[:BLOCK[:ALLOCATION]]",
                        help="minilm: the int4 + lqer rows (rank, factor storage, int4 block, uniform or measured "
                             "ranks; 0 as rank: int4 alone)")
    parser.add_argument("--auto-targets", nargs="*", default=["0.99", "0.985", "0.98"], metavar="C[:BLOCK]",
                        help="minilm: the --quantize auto rows (target cosine, int4 block)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model for the speedup")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw --plot from the rows of an earlier --json")
    args = parser.parse_args()
    THREADS = args.threads
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    corrections = [(int(parts[0]), parts[1], int(parts[2]) if len(parts) > 2 else 32,
                    parts[3] if len(parts) > 3 else "uniform") for parts in (item.split(":") for item in args.corrections)]
    rows = frontier(args.model, args.budgets, args.modes, None if args.no_target else args.target_cosine, args.runs,
                    not args.no_tables, corrections,
                    [(float(item.split(":")[0]), int(item.split(":")[1]) if ":" in item else 32)
                     for item in args.auto_targets])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    print(markdown(rows))


if __name__ == "__main__":
    main()
