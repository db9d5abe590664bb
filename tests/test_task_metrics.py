"""A language model's task metrics in verification: next-token perplexity of both models and next-token top-1
agreement, on the inputs' own text (attended positions), checked against torch's cross-entropy; a gate on them."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from graphs import init, make_model, onnxlr_cli, tensor_input
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxlr.verification.verify import Gates, compare_arrays, is_language_model_logits, language_model_metrics

VOCAB, HIDDEN = 40, 16


def bigram_lm(seed: int = 0, noise: float = 0.0) -> onnx.ModelProto:
    """input_ids, attention_mask -> Gather(E) -> MatMul(W) -> logits [n, seq, VOCAB]: a bigram language model."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    weight = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    weight += noise * np.random.default_rng(seed).standard_normal(weight.shape).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["h", "m3"], ["masked"]),
             helper.make_node("MatMul", ["masked", "W"], ["logits"], name="lm_head")]
    inputs = [tensor_input(name, ["n", "seq"], onnx.TensorProto.INT64) for name in ("input_ids", "attention_mask")]
    return make_model(nodes, inputs, [tensor_input("logits", ["n", "seq", VOCAB])],
                      [init("E", table), init("W", weight), init("axes", np.array([-1], np.int64))])


def torch_perplexity(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    torch = pytest.importorskip("torch")
    where = torch.as_tensor((mask[:, :-1] != 0) & (mask[:, 1:] != 0))
    rows = torch.as_tensor(logits[:, :-1], dtype=torch.float64)[where]
    targets = torch.as_tensor(ids[:, 1:])[where]
    return math.exp(float(torch.nn.functional.cross_entropy(rows, targets)))


@settings(max_examples=40, deadline=None)
@given(samples=st.integers(1, 4), length=st.integers(2, 7), seed=st.integers(0, 2**16), left_pad=st.booleans())
def test_perplexity_is_torchs_cross_entropy_on_the_attended_next_tokens(samples, length, seed, left_pad):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (samples, length))
    mask = np.ones((samples, length), np.int64)
    for row in range(samples):
        cut = int(rng.integers(0, length - 1))
        if left_pad:
            mask[row, :cut] = 0
        else:
            mask[row, length - cut:] = 0
    reference = rng.standard_normal((samples, length, VOCAB)).astype(np.float32)
    candidate = reference + 0.5 * rng.standard_normal(reference.shape).astype(np.float32)
    metrics = language_model_metrics(reference, candidate, ids, mask)
    assert metrics["reference_perplexity"] == pytest.approx(torch_perplexity(reference, ids, mask), rel=1e-9)
    assert metrics["perplexity"] == pytest.approx(torch_perplexity(candidate, ids, mask), rel=1e-9)
    assert metrics["perplexity_kept"] == pytest.approx(metrics["reference_perplexity"] / metrics["perplexity"])
    attended = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    assert metrics["next_tokens"] == attended.sum()
    expected = np.mean(np.argmax(reference[:, :-1][attended], -1) == np.argmax(candidate[:, :-1][attended], -1))
    assert metrics["top1_agreement"] == pytest.approx(expected)
    same = language_model_metrics(reference, reference, ids, mask)
    assert same["perplexity_kept"] == 1.0 and same["top1_agreement"] == 1.0


def test_only_logits_over_the_ids_vocabulary_count_as_a_language_model():
    ids = np.array([[1, 5, 39]])
    assert is_language_model_logits(np.zeros((1, 3, VOCAB), np.float32), ids, "logits")
    assert not is_language_model_logits(np.zeros((1, 3, 39), np.float32), ids, "logits")  # id 39 not covered
    assert not is_language_model_logits(np.zeros((1, 3, VOCAB), np.float32), ids, "last_hidden_state")
    assert not is_language_model_logits(np.zeros((1, 3, VOCAB), np.float32), ids, "y")  # hidden states, perhaps
    assert not is_language_model_logits(np.zeros((1, 3, VOCAB), np.float32), None, "logits")
    assert not is_language_model_logits(np.zeros((1, 3), np.float32), ids, "logits")
    metrics = compare_arrays(np.ones((1, 3, VOCAB), np.float32), np.ones((1, 3, VOCAB), np.float32), Gates(),
                             "logits", token_ids=ids)
    assert metrics["perplexity"] == pytest.approx(VOCAB)  # uniform logits: every token equally likely


def test_verify_reports_both_perplexities_and_gates_on_the_perplexity_kept(tmp_path):
    reference, candidate = tmp_path / "lm.onnx", tmp_path / "lm-noisy.onnx"
    onnx.save(bigram_lm(), reference)
    onnx.save(bigram_lm(noise=0.3), candidate)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (12, 9))
    mask = np.ones_like(ids)
    mask[:4, 6:] = 0
    np.savez(tmp_path / "text.npz", input_ids=ids, attention_mask=mask)
    summary = tmp_path / "verify.json"
    result = onnxlr_cli("verify", str(reference), str(candidate), "--inputs", str(tmp_path / "text.npz"),
                        "--no-gate", "--json", str(summary))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(summary.read_text())["providers"]["cpu"]["outputs"]["logits"]
    assert metrics["next_tokens"] == int(((mask[:, :-1] != 0) & (mask[:, 1:] != 0)).sum())
    assert 0 < metrics["perplexity_kept"] < 1.5 and 0 < metrics["top1_agreement"] < 1
    assert "next-token perplexity on the inputs (logits, cpu" in result.stdout
    kept = metrics["perplexity_kept"]
    assert onnxlr_cli("verify", str(reference), str(candidate), "--inputs", str(tmp_path / "text.npz"),
                      "--min-metric", f"perplexity_kept={kept - 0.01}").returncode == 0
    failed = onnxlr_cli("verify", str(reference), str(candidate), "--inputs", str(tmp_path / "text.npz"),
                        "--min-metric", f"perplexity_kept={kept + 0.01}")
    assert failed.returncode == 1 and "perplexity_kept" in failed.stdout + failed.stderr
