"""Which activations the `attention_mask` input masks during calibration: by provenance, not by shape.

An encoder-decoder's decoder activations are [batch, decoder_seq, K]; when a batch's decoder length
equals its encoder length, a shape test (`activation.shape[:2] == mask.shape`) would drop real
decoder rows at the encoder's padding. Every expected Gram here is computed with numpy from the
same inputs, and each case holds a probe that shape test gets wrong (equal lengths in the data).
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import init, make_model, tensor_input
from onnx import TensorProto, helper

import onnxlr
from onnxlr.calibrate import calibration

K, VOCAB = 8, 20
BATCH, LENGTH = 3, 5  # encoder and decoder length alike: the case the shape test gets wrong
LENGTHS = [5, 3, 2]  # real tokens per encoder row, the rest padding
INT = TensorProto.INT64


def weights(*names: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    shapes = {"E": (VOCAB, K), "F": (VOCAB, K), "T": (2, K)}
    return {name: rng.standard_normal(shapes.get(name, (K, K))).astype(np.float32) for name in names}


def padded_mask() -> np.ndarray:
    return (np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)


def gram(x: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    rows = (x[keep] if keep is not None else x.reshape(-1, x.shape[-1])).astype(np.float64)
    return rows.T @ rows


def collect(model, feeds) -> dict[str, np.ndarray]:
    return calibration.collect_grams(model.SerializeToString(), onnxlr.load(model).model, feeds, batch_size=BATCH)


def encoder_decoder(dims: str, reshape: bool = False):
    """input_ids/attention_mask [batch, seq] -> encoder; decoder_input_ids [batch, dec_seq] -> decoder
    queries that attend to the encoder (cross-attention, the encoder's mask on the scores).

    Probes (by output): enc_h (reads encoder embeddings), kv (reads the encoder's output),
    q (decoder embeddings), y (the cross-attention context, decoder positions).
    `reshape`: the embeddings go through Reshape(0, -1, K), where shape inference loses the dim
    names, so provenance decides."""
    enc_dims, dec_dims = (["batch", "seq"], ["batch", "dec_seq"]) if dims == "named" else ([BATCH, LENGTH],) * 2
    w = weights("E", "F", "W_enc", "W_kv", "W_dec", "W_out")
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["enc"]),
             helper.make_node("Gather", ["F", "decoder_input_ids"], ["dec"])]
    enc, dec = "enc", "dec"
    if reshape:
        nodes += [helper.make_node("Reshape", ["enc", "rows"], ["enc_r"]),
                  helper.make_node("Reshape", ["dec", "rows"], ["dec_r"])]
        enc, dec = "enc_r", "dec_r"
    nodes += [
        helper.make_node("MatMul", [enc, "W_enc"], ["enc_h"]),
        helper.make_node("MatMul", ["enc_h", "W_kv"], ["kv"]),
        helper.make_node("MatMul", [dec, "W_dec"], ["q"]),
        helper.make_node("Transpose", ["kv"], ["kv_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kv_t"], ["scores"]),  # [batch, dec_seq, seq]
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m3"]),
        helper.make_node("Sub", ["m3", "one"], ["m_off"]),
        helper.make_node("Mul", ["m_off", "big"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked_scores"]),
        helper.make_node("Softmax", ["masked_scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "kv"], ["ctx"]),  # [batch, dec_seq, K]
        helper.make_node("MatMul", ["ctx", "W_out"], ["y"]),
    ]
    constants = [init(name, array) for name, array in w.items()]
    constants += [init("axis1", np.array([1], np.int64)), init("one", np.float32(1.0)),
                  init("big", np.float32(1e4)), init("rows", np.array([0, -1, K], np.int64))]
    model = make_model(nodes, [tensor_input("input_ids", enc_dims, INT), tensor_input("attention_mask", enc_dims, INT),
                               tensor_input("decoder_input_ids", dec_dims, INT)],
                       [tensor_input("y", None), tensor_input("kv", None)], constants)
    return model, w


def encoder_decoder_feeds():
    rng = np.random.default_rng(5)
    return {"input_ids": rng.integers(0, VOCAB, (BATCH, LENGTH)), "attention_mask": padded_mask(),
            "decoder_input_ids": rng.integers(0, VOCAB, (BATCH, LENGTH))}


def encoder_decoder_activations(w, feeds):
    """The four probes' activations, in numpy (float64)."""
    enc = w["E"][feeds["input_ids"]].astype(np.float64)
    dec = w["F"][feeds["decoder_input_ids"]].astype(np.float64)
    enc_h = enc @ w["W_enc"]
    kv = enc_h @ w["W_kv"]
    scores = (dec @ w["W_dec"]) @ kv.transpose(0, 2, 1) + (feeds["attention_mask"][:, None, :] - 1.0) * 1e4
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return {"enc_h": enc, "kv": enc_h, "q": dec, "y": p @ kv}


@pytest.mark.parametrize("reshape", [False, True], ids=["named-dims", "names-lost"])
def test_encoder_mask_leaves_decoder_rows_alone(reshape):
    model, w = encoder_decoder("named", reshape)
    feeds = encoder_decoder_feeds()
    grams = collect(model, feeds)
    activations = encoder_decoder_activations(w, feeds)
    keep = feeds["attention_mask"] != 0
    assert set(grams) == {"enc_h", "kv", "q", "y"}
    for key in ("q", "y"):  # decoder positions: every row counts
        assert not np.allclose(gram(activations[key]), gram(activations[key], keep), rtol=1e-3)
        np.testing.assert_allclose(grams[key], gram(activations[key]), rtol=1e-4, atol=1e-4)
    for key in ("enc_h", "kv"):  # encoder positions (kv: cross-attention keys/values): padding left out
        np.testing.assert_allclose(grams[key], gram(activations[key], keep), rtol=1e-4, atol=1e-4)


def test_static_encoder_decoder_applies_no_mask():
    """Fixed dims cannot tell the two sequences apart and the token inputs form two streams: the
    safe choice, no mask (padding adds noise; a wrong mask would drop real decoder rows)."""
    model, w = encoder_decoder("static")
    feeds = encoder_decoder_feeds()
    grams = collect(model, feeds)
    activations = encoder_decoder_activations(w, feeds)
    for key in ("enc_h", "kv", "q", "y"):
        np.testing.assert_allclose(grams[key], gram(activations[key]), rtol=1e-4, atol=1e-4)


def bert_like(dims: str):
    """input_ids + token_type_ids embeddings (one token stream), two stacked MatMuls; with named
    dims also a time-major [seq, batch, K] activation, which the mask does not index."""
    seq_dims = ["batch", "seq"] if dims == "named" else [LENGTH, LENGTH]
    w = weights("E", "T", "W1", "W2", "W3")
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["tok"]),
             helper.make_node("Gather", ["T", "token_type_ids"], ["typ"]),
             helper.make_node("Add", ["tok", "typ"], ["emb"]),
             helper.make_node("MatMul", ["emb", "W1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"])]
    outputs = [tensor_input("h2", None)]
    if dims == "named":
        nodes += [helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0, 2]),
                  helper.make_node("MatMul", ["emb_t", "W3"], ["tm"])]
        outputs.append(tensor_input("tm", None))
    inputs = [tensor_input(name, seq_dims, INT) for name in ("input_ids", "token_type_ids", "attention_mask")]
    return make_model(nodes, inputs, outputs, [init(n, a) for n, a in w.items() if n != "W3" or dims == "named"]), w


@pytest.mark.parametrize("dims", ["named", "static"])
def test_encoder_only_model_is_masked_throughout(dims):
    model, w = bert_like(dims)
    rng = np.random.default_rng(8)
    # batch == seq: a time-major [seq, batch, K] activation has the mask's shape too
    feeds = {"input_ids": rng.integers(0, VOCAB, (LENGTH, LENGTH)),
             "token_type_ids": rng.integers(0, 2, (LENGTH, LENGTH)),
             "attention_mask": (np.arange(LENGTH)[None, :] < np.array([5, 4, 3, 2, 1])[:, None]).astype(np.int64)}
    grams = calibration.collect_grams(model.SerializeToString(), onnxlr.load(model).model, feeds, batch_size=LENGTH)
    keep = feeds["attention_mask"] != 0
    emb = (w["E"][feeds["input_ids"]] + w["T"][feeds["token_type_ids"]]).astype(np.float64)
    h1 = (w["E"][feeds["input_ids"]] + w["T"][feeds["token_type_ids"]]) @ w["W1"]
    np.testing.assert_allclose(grams["h1"], gram(emb, keep), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grams["h2"], gram(np.maximum(h1, 0), keep), rtol=1e-4, atol=1e-4)
    if dims == "named":  # time-major: its second axis is the batch, all rows count
        emb_t = emb.transpose(1, 0, 2)
        assert not np.allclose(gram(emb_t), gram(emb_t, keep), rtol=1e-3)
        np.testing.assert_allclose(grams["tm"], gram(emb_t), rtol=1e-4, atol=1e-4)
