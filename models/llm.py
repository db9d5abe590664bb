"""LLM-shaped models with random weights in external data: ~1.06B fp32 params (4.2 GB) and ~8B (16 GB fp16, 32 GB fp32).

They exercise the large-model path (external data, > 2 GB, path-based checking, models larger than
memory). The layer sizes of llm-1b are those of a TinyLlama-1.1B-style decoder; llm-8b has a
Llama-3-8B-style layer stack (hidden 4096, MLP 14336, 32 layers; q/k/v all 4096 wide, vocab 32000).
Weights are generated and written one chunk at a time, so building never holds a tensor in memory.
Outputs: model.onnx, model.onnx.data, calib.npz / eval.npz (random "input_ids").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from models.synthetic import llm_shaped

CONFIG_1B = {"n_layers": 18, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "seed": 0, "dtype": "float32"}
CONFIG_8B = {"n_layers": 32, "hidden": 4096, "intermediate": 14336, "vocab": 32000, "seed": 0, "dtype": "float16"}
SEQ = 32


def random_ids(batch: int, seed: int, vocab: int) -> dict[str, np.ndarray]:
    ids = np.random.RandomState(seed).randint(0, vocab, size=(batch, SEQ))
    return {"input_ids": ids.astype(np.int64)}


def build_1b(out_dir: Path) -> dict:
    return build_llm(out_dir, CONFIG_1B)


def build_8b(out_dir: Path) -> dict:
    return build_llm(out_dir, CONFIG_8B)


def build_8b_fp32(out_dir: Path) -> dict:
    return build_llm(out_dir, {**CONFIG_8B, "dtype": "float32"})


def build_llm(out_dir: Path, config: dict) -> dict:
    path = out_dir / "model.onnx"
    print(f"  writing {config['n_layers']} layers of random {config['dtype']} weights to {path.name}.data", flush=True)
    n_params = llm_shaped(path, **config)
    # The path-based check reads the weights from disk instead of loading them into a proto,
    # which is the only way to check a model over 2 GB.
    onnx.checker.check_model(str(path), full_check=True)
    np.savez(out_dir / "calib.npz", **random_ids(8, seed=1, vocab=config["vocab"]))
    np.savez(out_dir / "eval.npz", **random_ids(4, seed=2, vocab=config["vocab"]))
    print(f"  {n_params / 1e9:.3f}B parameters, checked", flush=True)
    return {"params": n_params, "config": config, "seq_len": SEQ}
