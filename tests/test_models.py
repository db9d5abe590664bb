"""The reference-model builders in models/: synthetic generators, the LLM-shaped writer, the cache, and
(marked slow) the digits CNN and MiniLM builds."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import models
from models import synthetic
from models.__main__ import main as models_cli


def _declared_shape(value: onnx.ValueInfoProto, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d.dim_value or sizes[d.dim_param] for d in value.type.tensor_type.shape.dim)


def _weights_of(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == op_type and n.input[1] in inits]


def _attr(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


# --- synthetic generators ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(synthetic.GENERATORS))
@pytest.mark.parametrize("batch", [1, 3])
def test_generator_is_valid_and_runs_with_declared_shapes(name, batch):
    model = synthetic.GENERATORS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == synthetic.OPSET
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in model.graph.input)

    feeds = synthetic.random_inputs(model, batch=batch, seq=5)
    outputs = synthetic.run(model, feeds)
    for value, out in zip(model.graph.output, outputs, strict=True):
        assert out.shape == _declared_shape(value, {"batch": batch, "seq": 5})
        assert np.isfinite(out).all() and out.std() > 1e-3  # activations neither blew up nor died


def test_generators_are_deterministic_in_their_seed():
    for generator in synthetic.GENERATORS.values():
        assert generator(seed=3).SerializeToString() == generator(seed=3).SerializeToString()
        assert generator(seed=3).SerializeToString() != generator(seed=4).SerializeToString()


def test_mlp_mixes_matmul_and_both_gemm_layouts():
    model = synthetic.mlp()
    assert len(_weights_of(model, "MatMul")) == 1
    gemms = _weights_of(model, "Gemm")
    assert sorted(_attr(g, "transB") or 0 for g in gemms) == [0, 1]
    assert sorted(len(g.input) for g in gemms) == [2, 3]  # with and without bias


def test_transformer_block_has_qkvo_and_mlp_weights_on_3d_activations():
    model = synthetic.transformer_block(hidden=32, heads=2, intermediate=64, n_layers=3)
    assert len(_weights_of(model, "MatMul")) == 3 * 6  # q, k, v, o, up, down per layer
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    out = synthetic.run(model, synthetic.random_inputs(model, batch=2, seq=7))[0]
    assert out.shape == (2, 7, 32)


def test_convnet_covers_the_conv_variants():
    model = synthetic.convnet()
    inits = {t.name: t for t in model.graph.initializer}
    convs = _weights_of(model, "Conv")
    kernels = [tuple(_attr(c, "kernel_shape")) for c in convs]
    in_channels = {c.name: inits[c.input[1]].dims[1] * _attr(c, "group") for c in convs}

    assert {len(k) for k in kernels} == {1, 2, 3}  # 1-D, 2-D and 3-D
    assert {(1, 1), (3, 3), (3, 1)} <= set(kernels)
    assert any(max(_attr(c, "strides")) > 1 for c in convs)
    assert any(max(_attr(c, "dilations")) > 1 for c in convs)
    assert any(1 < _attr(c, "group") < in_channels[c.name] for c in convs)  # grouped
    assert any(_attr(c, "group") == in_channels[c.name] > 1 for c in convs)  # depthwise
    assert any(len(set(_attr(c, "pads"))) > 1 for c in convs)  # asymmetric pads
    assert {len(c.input) for c in convs} == {2, 3}  # without and with bias


# --- LLM-shaped model with external data ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_llm_shaped_writes_external_data_and_runs(tmp_path, dtype):
    path = tmp_path / "llm.onnx"
    n_layers, hidden, intermediate, vocab = 2, 32, 88, 300
    n_params = synthetic.llm_shaped(path, n_layers, hidden, intermediate, vocab, seed=1, dtype=dtype)

    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    assert n_params == n_layers * per_layer + 2 * vocab * hidden + hidden

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(path, load_external_data=False)
    inits = model.graph.initializer
    assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in inits)
    assert sum(int(np.prod(t.dims)) for t in inits) == n_params
    entries = [{e.key: e.value for e in t.external_data} for t in inits]
    assert {e["location"] for e in entries} == {"llm.onnx.data"}
    assert all(int(e["offset"]) % synthetic.DATA_ALIGNMENT == 0 for e in entries)
    data_size = (tmp_path / "llm.onnx.data").stat().st_size
    assert max(int(e["offset"]) + int(e["length"]) for e in entries) == data_size
    assert path.stat().st_size < 20_000  # the proto itself holds no weights

    ids = np.random.RandomState(0).randint(0, vocab, size=(2, 5)).astype(np.int64)
    logits = synthetic.run(path, {"input_ids": ids})[0]
    assert logits.shape == (2, 5, vocab) and logits.dtype == np.dtype(dtype)
    assert np.isfinite(logits).all()


def test_llm_shaped_has_the_projection_weights_of_a_decoder(tmp_path):
    synthetic.llm_shaped(tmp_path / "m.onnx", n_layers=3, hidden=16, intermediate=40, vocab=50)
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for proj in ("q", "k", "v", "o"):
        assert shapes[f"model.layers.2.self_attn.{proj}_proj.weight"] == (16, 16)
    assert shapes["model.layers.2.mlp.gate_proj.weight"] == (16, 40)
    assert shapes["model.layers.2.mlp.down_proj.weight"] == (40, 16)
    assert shapes["model.embed_tokens.weight"] == (50, 16) and shapes["lm_head.weight"] == (16, 50)
    assert len(_weights_of(model, "MatMul")) == 3 * 7 + 1


# --- cache and CLI ----------------------------------------------------------------------------


def test_build_writes_manifest_then_reports_up_to_date(tmp_path, capsys):
    folder = models.build("synthetic", cache=tmp_path)
    assert folder == tmp_path / "synthetic"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["builder_version"] == models.BUILDERS["synthetic"].version
    for name in synthetic.GENERATORS:
        assert {f"{name}/model.onnx", f"{name}/calib.npz", f"{name}/eval.npz"} <= set(manifest["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left

    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert models.build("synthetic", cache=tmp_path) == folder
    assert "up to date" in capsys.readouterr().out
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp

    (folder / "mlp" / "eval.npz").write_bytes(b"truncated")  # a damaged copy is rebuilt
    models.build("synthetic", cache=tmp_path)
    assert "up to date" not in capsys.readouterr().out
    assert set(np.load(folder / "mlp" / "eval.npz")) == {"input"}


def test_cache_env_var_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNXLR_MODEL_CACHE", str(tmp_path))
    assert models.model_dir("minilm") == tmp_path / "minilm"
    assert models_cli(["build", "synthetic"]) == 0
    assert (tmp_path / "synthetic" / "manifest.json").is_file()
    capsys.readouterr()
    assert models_cli(["list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"synthetic +built", listing) and re.search(r"digits-cnn +not built", listing)
    with pytest.raises(ValueError, match="unknown model"):
        models.build("nope", cache=tmp_path)


# --- ocr-crnn: the full build trains for minutes, so this runs the builder for two steps -----------


def test_ocr_crnn_builder_writes_disjoint_rendered_lines_and_a_ctc_model(tmp_path, monkeypatch):
    from models import ocr_crnn

    monkeypatch.setattr(ocr_crnn, "STEPS", 2)
    monkeypatch.setattr(ocr_crnn, "N_EVAL", 16)
    folder = models.build("ocr-crnn", cache=tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"model.onnx", "calib.npz", "eval.npz", "calib.txt", "eval.txt"} <= set(manifest["files"])
    alphabet = manifest["alphabet"]

    evals, calib = np.load(folder / "eval.npz"), np.load(folder / "calib.npz")
    assert set(evals) == {"input", "labels", "label_lengths"} and set(calib) == {"input"}
    assert evals["input"].shape == (16, 1, 32, 128) and evals["input"].dtype == np.float32
    assert calib["input"].shape == (256, 1, 32, 128)
    assert 0.0 <= evals["input"].min() and evals["input"].max() <= 1.0
    labels, lengths = evals["labels"], evals["label_lengths"]
    assert labels.shape == (16, 12) and labels.dtype == lengths.dtype == np.int64
    assert ((4 <= lengths) & (lengths <= 12)).all()
    assert all((row[n:] == 0).all() and (row[:n] >= 1).all() for row, n in zip(labels, lengths))
    eval_lines = (folder / "eval.txt").read_text().splitlines()
    assert ["".join(alphabet[c - 1] for c in row[:n]) for row, n in zip(labels, lengths)] == eval_lines

    # Held-out lines are made of words that no training line uses, whatever their case or punctuation.
    train_tokens, eval_tokens = ocr_crnn.collect_tokens()
    train_words = {ocr_crnn.word_key(t) for t in train_tokens}
    assert not train_words & {ocr_crnn.word_key(t) for t in eval_tokens}
    assert not train_words & {ocr_crnn.word_key(w) for line in eval_lines for w in line.split()}
    calib_lines = (folder / "calib.txt").read_text().splitlines()
    assert len(calib_lines) == 256
    assert {ocr_crnn.word_key(w) for line in calib_lines for w in line.split()} <= train_words

    model = onnx.load(folder / "model.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    conv_shapes = [tuple(inits[c.input[1]].dims) for c in _weights_of(model, "Conv")]
    assert (480, 480, 1, 1) in conv_shapes and (64, 64, 3, 3) in conv_shapes and (256, 1, 3, 3) in conv_shapes
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]  # folded into the convs
    assert len(_weights_of(model, "MatMul")) == 1
    logits = synthetic.run(folder / "model.onnx", {"input": evals["input"]})[0]
    assert logits.shape == (16, 32, len(alphabet) + 1)
    char_accuracy, _ = ocr_crnn.scores(logits, labels, lengths)
    assert char_accuracy == pytest.approx(manifest["char_accuracy"])


def test_ocr_greedy_decoding_and_edit_distance():
    from models import ocr_crnn

    logits = np.full((1, 7, 4), -1.0, dtype=np.float32)
    for t, c in enumerate([1, 1, 0, 1, 2, 0, 0]):
        logits[0, t, c] = 1.0
    assert ocr_crnn.greedy_decode(logits) == [[1, 1, 2]]  # repeats merge unless a blank separates them
    assert ocr_crnn.edit_distance([1, 2, 3], [1, 3]) == 1
    assert ocr_crnn.edit_distance([], [4, 5]) == 2
    assert ocr_crnn.edit_distance([1, 2, 3, 4], [2, 1, 3, 5]) == 3


# --- real models (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_digits_cnn_builds_and_is_accurate(tmp_path):
    folder = models.build("digits-cnn", cache=tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["accuracy"] >= 0.95

    evals, calib = np.load(folder / "eval.npz"), np.load(folder / "calib.npz")
    assert evals["input"].shape == (manifest["n_eval"], 1, 8, 8) and evals["input"].dtype == np.float32
    assert calib["input"].shape == (256, 1, 8, 8)
    assert 0.0 <= evals["input"].min() and evals["input"].max() <= 1.0
    logits = synthetic.run(folder / "model.onnx", {"input": evals["input"]})[0]
    assert (logits.argmax(1) == evals["labels"]).mean() == pytest.approx(manifest["accuracy"])

    model = onnx.load(folder / "model.onnx")
    kernels = {tuple(_attr(c, "kernel_shape")) for c in _weights_of(model, "Conv")}
    assert {(1, 1), (3, 3)} <= kernels
    assert len(_weights_of(model, "Gemm")) == 2


@pytest.mark.slow
def test_minilm_builds_with_disjoint_text_and_valid_ids(tmp_path):
    folder = models.build("minilm", cache=tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert min(manifest["min_cosine_eval"], manifest["min_cosine_short_seq"]) > 0.9999

    calib_texts = (folder / "calib.txt").read_text().splitlines()
    eval_texts = (folder / "eval.txt").read_text().splitlines()
    assert (len(calib_texts), len(eval_texts)) == (512, 256)
    assert not set(calib_texts) & set(eval_texts)
    assert all(6 <= len(t.split()) <= 60 for t in calib_texts + eval_texts)

    for name, n in (("calib.npz", 512), ("eval.npz", 256)):
        data = np.load(folder / name)
        assert set(data) == {"input_ids", "attention_mask"}
        assert data["input_ids"].shape == data["attention_mask"].shape == (n, 64)
        assert data["input_ids"].dtype == np.int64
        assert 0 <= data["input_ids"].min() and data["input_ids"].max() < manifest["vocab_size"]
        assert (data["attention_mask"][:, 0] == 1).all()  # every row holds a sentence

    emb = synthetic.run(folder / "model.onnx", dict(np.load(folder / "eval.npz")))[0]
    assert emb.shape == (256, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
