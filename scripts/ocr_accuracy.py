"""Held-out accuracy of ocr-crnn models (original and optimized) with onnxruntime on the CPU.

Greedy CTC decoding (argmax per column, repeats merged, blank 0 dropped); character accuracy is
1 - sum(edit distance) / sum(reference length) over the eval lines, line accuracy the share of lines
read exactly.

    python scripts/ocr_accuracy.py .cache/models/ocr-crnn/model.onnx /tmp/ocr-lr.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.ctc import edit_distance, greedy_decode  # noqa: E402


def read(model_path: Path, images: np.ndarray) -> list[list[int]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return greedy_decode(session.run(None, {input_name: images})[0])


def accuracy(model_path: Path, data: dict) -> tuple[float, float]:
    """Character and line accuracy of a model on `data` (input, labels, label_lengths)."""
    truth = [row[:n].tolist() for row, n in zip(data["labels"], data["label_lengths"])]
    decoded = read(model_path, data["input"])
    errors = sum(edit_distance(d, t) for d, t in zip(decoded, truth))
    exact = sum(d == t for d, t in zip(decoded, truth))
    return 1 - errors / int(data["label_lengths"].sum()), exact / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="ONNX models taking the ocr-crnn line images")
    parser.add_argument("--eval", type=Path, default=Path(".cache/models/ocr-crnn/eval.npz"),
                        help="held-out set (default: %(default)s)")
    parser.add_argument("--errors", type=int, default=0, metavar="N",
                        help="also print the first N misread lines of each model (alphabet from the "
                             "manifest.json beside --eval)")
    args = parser.parse_args()
    data = np.load(args.eval)
    truth = [row[:n].tolist() for row, n in zip(data["labels"], data["label_lengths"])]
    n_chars = int(data["label_lengths"].sum())
    alphabet = None
    if args.errors:
        alphabet = json.loads((args.eval.parent / "manifest.json").read_text())["alphabet"]
    for path in args.models:
        decoded = read(path, data["input"])
        errors = sum(edit_distance(d, t) for d, t in zip(decoded, truth))
        exact = sum(d == t for d, t in zip(decoded, truth))
        print(f"{path}: character accuracy {1 - errors / n_chars:.4f}, "
              f"line accuracy {exact / len(truth):.4f} on {len(truth)} lines ({n_chars} characters)")
        if alphabet:
            wrong = [(t, d) for d, t in zip(decoded, truth) if d != t][: args.errors]
            for t, d in wrong:
                text = "".join(alphabet[c - 1] for c in t)
                print(f"  {text!r:16} read as {''.join(alphabet[c - 1] for c in d)!r}")


if __name__ == "__main__":
    main()
