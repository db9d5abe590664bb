"""onnxruntime's weight-only quantizer on MiniLM's MatMuls (the embedding table left float), in one run:

    python scripts/bench_weight_only.py [--runs 20] [--threads 2]

Fidelity rows: MatMulNBits at 4 bits with RTN symmetric / asymmetric and HQQ, blocks 32 and 64: the bytes of the
quantized MatMul tensors and the mean cosine of the held-out sentence embeddings (eval.npz) to the original's.
Speed rows: 4 and 8 bits, accuracy_level unset (float compute) and 4 (int8 compute), and per-channel dynamic INT8,
each timed end to end against the original (onnxlr.timing.bench: interleaved runs, median of per-run ratios,
32 sentences x 64 tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxlr.timing import bench  # noqa: E402

FOLDER = ROOT / ".cache" / "models" / "minilm"


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    source = str(FOLDER / "model.onnx")
    names = [i.name for i in onnx.load(source, load_external_data=False).graph.input]
    feeds = {k: v for k, v in np.load(FOLDER / "eval.npz").items() if k in names}
    reference = ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    def cosine(model: onnx.ModelProto) -> float:
        out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        dots = np.sum(reference * out, axis=1)
        return float(np.mean(dots / np.linalg.norm(reference, axis=1) / np.linalg.norm(out, axis=1)))

    def quantized(**options) -> onnx.ModelProto:
        quantizer = MatMulNBitsQuantizer(onnx.load(source), **options)
        quantizer.process()
        return quantizer.model.model

    def matmul_bytes(model: onnx.ModelProto) -> int:
        by_node = {name for n in model.graph.node if n.op_type == "MatMulNBits" for name in n.input[1:]}
        return sum(len(t.raw_data) for t in model.graph.initializer if t.name in by_node)

    print("| 4-bit weights | MatMul bytes | cosine |\n|---|---|---|")
    for label, options in (("RTN symmetric, block 32", dict(bits=4, block_size=32, is_symmetric=True)),
                           ("RTN asymmetric, block 32", dict(bits=4, block_size=32, is_symmetric=False)),
                           ("RTN symmetric, block 64", dict(bits=4, block_size=64, is_symmetric=True)),
                           ("RTN asymmetric, block 64", dict(bits=4, block_size=64, is_symmetric=False)),
                           ("HQQ, block 32", dict(algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))),
                           ("HQQ, block 64", dict(algo_config=HQQWeightOnlyQuantConfig(block_size=64, bits=4)))):
        model = quantized(**options)
        print(f"| {label} | {matmul_bytes(model):,} | {cosine(model):.5f} |", flush=True)

    print("\n| compute | speedup vs float (p10-p90) | cosine |\n|---|---|---|")
    batch = {k: v[:32] for k, v in feeds.items()}
    with tempfile.TemporaryDirectory() as folder:
        for bits in (4, 8):
            for level in (None, 4):
                model = quantized(bits=bits, block_size=32, is_symmetric=True, accuracy_level=level)
                path = Path(folder) / f"{bits}-{level}.onnx"
                onnx.save(model, path)
                speed = bench.benchmark([source, str(path)], batch, "cpu", threads=args.threads, runs=args.runs,
                                        warmup=5)["speedup"]
                print(f"| {bits}-bit, accuracy_level {level or 'unset'} | {speed['median']:.2f}x "
                      f"({speed['p10']:.2f}-{speed['p90']:.2f}) | {cosine(model):.5f} |", flush=True)
        path = Path(folder) / "int8.onnx"
        quantize_dynamic(source, path, per_channel=True, weight_type=QuantType.QInt8)
        speed = bench.benchmark([source, str(path)], batch, "cpu", threads=args.threads, runs=args.runs,
                                warmup=5)["speedup"]
        print(f"| dynamic INT8, per channel | {speed['median']:.2f}x ({speed['p10']:.2f}-{speed['p90']:.2f}) | "
              f"{cosine(onnx.load(path)):.5f} |")


if __name__ == "__main__":
    main()
