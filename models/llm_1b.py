"""A ~1.06B-parameter LLM-shaped model with random fp32 weights in external data (~4.2 GB on disk).

It exercises the large-model path (external data, > 2 GB, path-based checking). The layer sizes are
those of a TinyLlama-1.1B-style decoder. Outputs: model.onnx, model.onnx.data, calib.npz / eval.npz
(random "input_ids").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from models.synthetic import llm_shaped

CONFIG = {"n_layers": 18, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "seed": 0, "dtype": "float32"}
SEQ = 32


def random_ids(batch: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.RandomState(seed).randint(0, CONFIG["vocab"], size=(batch, SEQ))
    return {"input_ids": ids.astype(np.int64)}


def build(out_dir: Path) -> dict:
    path = out_dir / "model.onnx"
    print(f"  writing {CONFIG['n_layers']} layers of random weights to {path.name}.data", flush=True)
    n_params = llm_shaped(path, **CONFIG)
    # The path-based check reads the weights from disk instead of loading them into a proto,
    # which is the only way to check a model over 2 GB.
    onnx.checker.check_model(str(path), full_check=True)
    np.savez(out_dir / "calib.npz", **random_ids(8, seed=1))
    np.savez(out_dir / "eval.npz", **random_ids(4, seed=2))
    print(f"  {n_params / 1e9:.3f}B parameters, checked", flush=True)
    return {"params": n_params, "config": CONFIG, "seq_len": SEQ}
