"""Held-out accuracy of digits-cnn models (original and optimized) with onnxruntime on the CPU.

    python scripts/digits_accuracy.py .cache/models/digits-cnn/model.onnx out/digits-cnn-lr.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort


def accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    logits = session.run(None, {input_name: images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="ONNX models taking the digits images")
    parser.add_argument("--eval", type=Path, default=Path(".cache/models/digits-cnn/eval.npz"),
                        help="held-out set (default: %(default)s)")
    args = parser.parse_args()
    data = np.load(args.eval)
    for path in args.models:
        print(f"{path}: held-out accuracy {accuracy(path, data['input'], data['labels']):.4f} "
              f"on {len(data['labels'])} images")


if __name__ == "__main__":
    main()
