"""A small CNN trained on sklearn's 8x8 digits, exported to ONNX (Conv 3x3 and 1x1, Gemm).

Outputs: model.onnx (input "input" [batch, 1, 8, 8] float32, output "logits" [batch, 10]),
eval.npz (held-out "input" and "labels"), calib.npz (256 training images, "input").
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
EPOCHS = 40
BATCH = 64
LEARNING_RATE = 2e-3
N_CALIB = 256


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed stratified 75/25 split; images N x 1 x 8 x 8 float32 in [0, 1]."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # raw pixels are 0..16
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=SEED
    )
    return x_train, x_test, y_train, y_test


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """Adam with a one-cycle schedule; shuffling comes from a seeded generator so runs repeat."""
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    steps_per_epoch = (len(xs) + BATCH - 1) // BATCH
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LEARNING_RATE, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), BATCH):
            idx = order[i : i + BATCH]
            opt.zero_grad()
            loss_fn(model(xs[idx]), ys[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def train_seeded() -> tuple[nn.Module, float]:
    """Train from a fixed seed without leaking RNG or determinism settings to the caller."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        torch.use_deterministic_algorithms(True)
        try:
            model = make_model()
            x_train, _, y_train, _ = load_split()
            start = time.perf_counter()
            train(model, x_train, y_train)
            return model, time.perf_counter() - start
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


def export(model: nn.Module, path: Path) -> None:
    # The TorchScript exporter (dynamo=False) turns nn.Linear on 2-D input into Gemm, which is what
    # we want to exercise; its deprecation warning is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def build(out_dir: Path) -> dict:
    x_train, x_test, _, y_test = load_split()
    print(f"  training on {len(x_train)} images for {EPOCHS} epochs", flush=True)
    model, train_seconds = train_seeded()
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"  trained in {train_seconds:.1f}s, torch held-out accuracy {torch_acc:.4f}", flush=True)

    model_path = out_dir / "model.onnx"
    export(model, model_path)
    calib = x_train[np.random.RandomState(SEED).choice(len(x_train), N_CALIB, replace=False)]
    np.savez(out_dir / "eval.npz", input=x_test, labels=y_test)
    np.savez(out_dir / "calib.npz", input=calib)
    accuracy = onnx_accuracy(model_path, x_test, y_test)
    print(f"  onnxruntime held-out accuracy {accuracy:.4f} on {len(y_test)} images", flush=True)
    return {
        "accuracy": accuracy,
        "torch_accuracy": torch_acc,
        "n_eval": len(y_test),
        "n_calib": N_CALIB,
        "train_seconds": round(train_seconds, 1),
        "inputs": {"input": ["batch", 1, 8, 8]},
        "outputs": {"logits": ["batch", 10]},
    }
