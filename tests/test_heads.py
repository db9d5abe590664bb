"""Attention V·O head pairs (onnxlr.coupled.heads): found in BERT-style exports, exact when every head dimension is
kept, the padded feeds compute the sliced model, and the fit's error is what the data says."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, run, tensor_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxlr
from onnxlr.coupled import heads, joint

MODEL, HEADS, HEAD = 24, 4, 8  # model width, heads, head size (H·d = 32 != MODEL: the widths are checked)
SEQ = 5


def attention_model(*, split="concat", merge="minus_one", value_bias=True, out_bias=True, bias_first=True,
                    dtype=np.float32, opset=17, heads_=HEADS, head=HEAD, seed=0, low_rank=None, query_rank=None,
                    side_scales=False):
    """A BERT self-attention block as torch exports it: Q, K, V projections, Reshape + Transpose into heads,
    softmax(Q·Kᵀ·scale)·V, Transpose + Reshape back, the output projection, a residual Add.

    split: "concat" (Shape/Gather/Unsqueeze/Concat with [-1] and [d] constants, transformers' pattern),
    "constant" ([0, 0, H, d]), "inferred" ([0, 0, -1, d]) or "heads" ([0, 0, H, -1]).
    merge: "minus_one" ([0, 0, -1]), "constant" ([0, 0, H·d]) or "concat" (Concat with [H·d]).
    low_rank: each head's value projection of this rank (the joint fit then loses nothing at that k);
    query_rank: the same for the query projection (its head scores have rank query_rank + 1 with the bias);
    side_scales: the scale applied to each side before the scores (Div on the queries, Mul on the keys)."""
    rng = np.random.default_rng(seed)
    inner = heads_ * head
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def weight(rows, cols, scale=0.3):
        return (rng.standard_normal((rows, cols)) * scale).astype(dtype)

    wv = weight(MODEL, inner)
    if low_rank is not None:
        for h in range(heads_):
            wv[:, h * head:(h + 1) * head] = (weight(MODEL, low_rank, 0.5).astype(np.float64)
                                              @ weight(low_rank, head, 0.5)).astype(dtype)
    wq = weight(MODEL, inner)
    if query_rank is not None:
        for h in range(heads_):
            wq[:, h * head:(h + 1) * head] = (weight(MODEL, query_rank, 0.5).astype(np.float64)
                                              @ weight(query_rank, head, 0.5)).astype(dtype)
    weights = [init("Wq", wq), init("Wk", weight(MODEL, inner)), init("Wv", wv),
               init("Wo", weight(inner, MODEL)), init("scale", np.array(head ** -0.5, dtype=dtype)),
               init("bq", weight(1, inner)[0]), init("bk", weight(1, inner)[0])]
    nodes = []
    for name in "qkv":
        biased = name != "v" or value_bias
        nodes.append(helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}_mm" if biased else f"{name}_out"],
                                      name=f"{name}_proj"))
        if biased:
            operands = [f"b{name}", f"{name}_mm"] if bias_first else [f"{name}_mm", f"b{name}"]
            nodes.append(helper.make_node("Add", operands, [f"{name}_out"], name=f"{name}_bias"))
    if value_bias:
        weights.append(init("bv", weight(1, inner)[0]))
    if split == "concat":
        nodes += [helper.make_node("Shape", ["x"], ["x_shape"]),
                  helper.make_node("Gather", ["x_shape", "zero"], ["batch"], axis=0),
                  helper.make_node("Gather", ["x_shape", "one"], ["seq"], axis=0),
                  helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
                  helper.make_node("Unsqueeze", ["seq", "axes0"], ["seq1"])]
        weights += [init("zero", np.array(0, np.int64)), init("one", np.array(1, np.int64)),
                    init("axes0", np.array([0], np.int64))]
        for name in "qkv":  # one Concat per Reshape, as the exporter writes them
            weights += [init(f"{name}_minus", np.array([-1], np.int64)), init(f"{name}_head", np.array([head], np.int64))]
            nodes.append(helper.make_node("Concat", ["batch1", "seq1", f"{name}_minus", f"{name}_head"],
                                          [f"{name}_shape"], axis=0))
    else:
        entries = {"constant": [0, 0, heads_, head], "inferred": [0, 0, -1, head], "heads": [0, 0, heads_, -1]}[split]
        for name in "qkv":
            weights.append(init(f"{name}_shape", np.array(entries, np.int64)))
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [f"{name}_out", f"{name}_shape"], [f"{name}_split"], name=f"{name}_split"),
                  helper.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"], perm=perm)]
    if side_scales:
        weights += [init("q_scale", np.array(head ** 0.25, dtype=dtype)), init("k_scale", np.array(head ** -0.25, dtype=dtype))]
        nodes += [helper.make_node("Div", ["q_heads", "q_scale"], ["q_scaled"]),
                  helper.make_node("Mul", ["k_heads", "k_scale"], ["k_scaled"])]
    nodes += [helper.make_node("MatMul", ["q_scaled", "k_scaled"] if side_scales else ["q_heads", "k_heads"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_heads"], ["context"], name="context"),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3])]
    if merge == "concat":
        weights.append(init("merged", np.array([inner], np.int64)))
        nodes.append(helper.make_node("Concat", ["batch1", "seq1", "merged"], ["merge_shape"], axis=0))
        assert split == "concat"
    else:
        weights.append(init("merge_shape", np.array([0, 0, -1 if merge == "minus_one" else inner], np.int64)))
    nodes += [helper.make_node("Reshape", ["context_t", "merge_shape"], ["merged_context"], name="merge"),
              helper.make_node("MatMul", ["merged_context", "Wo"], ["o_mm" if out_bias else "o_out"], name="o_proj")]
    if out_bias:
        weights.append(init("bo", weight(1, MODEL)[0]))
        nodes.append(helper.make_node("Add", ["o_mm", "bo"], ["o_out"], name="o_bias"))
    nodes.append(helper.make_node("Add", ["o_out", "x"], ["y"]))
    return make_model(nodes, [tensor_input("x", ["batch", "seq", MODEL], elem)], [tensor_input("y", None, elem)],
                      weights, opset=opset)


def feeds(count=3, seed=1, dtype=np.float32):
    return {"x": np.random.default_rng(seed).standard_normal((count, SEQ, MODEL)).astype(dtype)}


def found(proto):
    model = ir.serde.deserialize_model(proto)
    pairs, rejected = heads.find_head_pairs(model)
    assert len(pairs) == 1, rejected
    return model, pairs[0], rejected


def contexts(proto, data):
    """O's input (the merged context) on `data`, as rows."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model.graph.output.append(helper.make_tensor_value_info("merged_context", model.graph.output[0].type.tensor_type.elem_type, None))
    return run(model, data)[1].reshape(-1, HEADS * HEAD).astype(np.float64)


def rewritten(model, slices, forget=()):
    """The serialized model with each slice's constant input replaced (as onnxlr.coupled.plans.rewrite does)."""
    for node, old, array in slices:
        value = ir.Value(name=f"{old.name}_new", const_value=ir.tensor(array))
        model.graph.register_initializer(value)
        node.replace_input_with(next(i for i, v in enumerate(node.inputs) if v is old), value)
    for value in forget:
        value.shape = None
    return ir.serde.serialize_model(model)


def correlation_of(proto, data):
    gram = joint.AugmentedGram()
    gram.add(contexts(proto, data))
    return gram.result()


def test_found_in_the_transformers_export_pattern_and_query_key_are_left_to_the_scores_finder():
    model, pair, rejected = found(attention_model())
    assert (pair.up.node.name, pair.down.node.name, pair.heads, pair.width, pair.kind) == ("v_proj", "o_proj", HEADS,
                                                                                           HEAD, "attention-vo")
    assert pair.split is not None and pair.merge is None  # [-1, d]: d is written out; the merge says -1
    reasons = {node.name: reason for node, reason in rejected}
    assert reasons == {"q_proj": heads.QUERY_OR_KEY, "k_proj": heads.QUERY_OR_KEY}


@pytest.mark.parametrize("split, merge", [("concat", "minus_one"), ("concat", "concat"), ("constant", "constant"),
                                          ("inferred", "minus_one"), ("heads", "constant")])
@pytest.mark.parametrize("value_bias, out_bias", [(True, True), (False, False), (True, False)])
def test_keeping_every_dimension_is_the_original(split, merge, value_bias, out_bias):
    proto = attention_model(split=split, merge=merge, value_bias=value_bias, out_bias=out_bias)
    model, pair, _ = found(proto)
    fit = pair.eliminate(correlation_of(proto, feeds())).fit(HEAD)
    slices = pair.fit_slices(fit)
    for _, old, array in slices[:4]:  # the weights and biases: the original arrays
        np.testing.assert_array_equal(array, ir.convenience.get_const_tensor(old).numpy())
    data = feeds(seed=5)
    np.testing.assert_allclose(run(rewritten(model, slices, pair.inner_values()), data)[0], run(proto, data)[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("split, merge", [("concat", "minus_one"), ("concat", "concat"), ("constant", "constant"),
                                          ("inferred", "minus_one"), ("heads", "constant")])
@pytest.mark.parametrize("keep", [1, 3, 7])
def test_the_padded_feeds_compute_the_sliced_model(split, merge, keep):
    """What calibration feeds for a fit (zeros at the dropped dimensions) is what the rewrite writes, and the
    rewritten model's O input has H·k columns."""
    proto = attention_model(split=split, merge=merge)
    model, pair, _ = found(proto)
    fit = pair.eliminate(correlation_of(proto, feeds())).fit(keep)
    data = feeds(seed=7)
    sliced = rewritten(model, pair.fit_slices(fit), pair.inner_values())
    onnx.checker.check_model(sliced, full_check=True)
    assert sum(array.size for _, old, array in pair.fit_slices(fit)
               if ir.convenience.get_const_tensor(old).dtype.is_floating_point()) == pair.weight_params(keep)
    model, pair, _ = found(proto)
    padded = rewritten(model, [(next(u.node for u in value.uses()), value, array) for value, array in pair.fit_feeds(fit)])
    np.testing.assert_allclose(run(sliced, data)[0], run(padded, data)[0], rtol=1e-5, atol=1e-5)
    probe = onnx.ModelProto()
    probe.CopyFrom(sliced)
    probe.graph.output.append(helper.make_tensor_value_info("merged_context", TensorProto.FLOAT, None))
    assert run(probe, data)[1].shape == (3, SEQ, HEADS * keep)


def test_the_fit_error_is_the_output_error_on_the_data_and_falls_with_k():
    proto = attention_model(out_bias=True)
    data = feeds(count=40, seed=3)
    model, pair, _ = found(proto)
    elimination = pair.eliminate(correlation_of(proto, data))
    c = contexts(proto, data)
    wo, bo = pair.down_matrix().astype(np.float64), pair.down_bias().astype(np.float64)
    reference = c @ wo + bo
    errors = []
    for keep in range(1, HEAD + 1):
        fit = elimination.fit(keep)
        matrix, bias = pair.effective_down(fit)
        measured = np.sum((c @ matrix + bias - reference) ** 2) / np.sum(reference**2)
        assert elimination.error(keep) == pytest.approx(measured, rel=1e-4, abs=1e-9)
        assert fit.relative_error == pytest.approx(elimination.error(keep), rel=1e-9, abs=1e-12)
        errors.append(elimination.error(keep))
    assert errors[-1] == 0.0
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))  # nested subspaces


def test_heads_of_low_rank_lose_nothing_at_that_rank():
    """Each head's value projection has rank 3: keeping 3 dimensions reproduces the block."""
    proto = attention_model(low_rank=3, seed=4)
    model, pair, _ = found(proto)
    fit = pair.eliminate(correlation_of(proto, feeds(count=30))).fit(3)
    assert fit.relative_error < 1e-9
    data = feeds(seed=9)
    out = run(rewritten(model, pair.fit_slices(fit), pair.inner_values()), data)[0]
    np.testing.assert_allclose(out, run(proto, data)[0], rtol=1e-4, atol=1e-4)


def test_a_shape_shared_with_another_reshape_is_not_a_pair():
    """One Concat feeding the Q, K and V splits (as a CSE pass writes it): changing it would break Q and K."""
    proto = attention_model(split="concat")
    for node in proto.graph.node:
        if node.op_type == "Reshape" and node.input[1] in ("q_shape", "k_shape"):
            node.input[1] = "v_shape"
    model = ir.serde.deserialize_model(proto)
    pairs, rejected = heads.find_head_pairs(model)
    assert not pairs
    assert "does not end in constant (heads, head size)" in dict((n.name, r) for n, r in rejected)["v_proj"]


def test_a_context_read_twice_is_not_a_pair():
    proto = attention_model()
    proto.graph.node.append(helper.make_node("Identity", ["merged_context"], ["extra"]))
    proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    model = ir.serde.deserialize_model(proto)
    pairs, rejected = heads.find_head_pairs(model)
    assert not pairs and "read by one linear layer alone" in dict((n.name, r) for n, r in rejected)["v_proj"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split=st.sampled_from(["concat", "constant", "inferred", "heads"]), value_bias=st.booleans(),
       out_bias=st.booleans(), bias_first=st.booleans(), half=st.booleans(), opset=st.sampled_from([13, 17, 21]),
       heads_=st.integers(1, 4), head=st.integers(2, 6), seed=st.integers(0, 2**16), keep_share=st.floats(0.0, 1.0))
def test_exact_at_full_size_and_padded_is_sliced_across_shapes_dtypes_and_opsets(split, value_bias, out_bias,
                                                                                 bias_first, half, opset, heads_,
                                                                                 head, seed, keep_share):
    dtype = np.float16 if half else np.float32
    merge = "constant" if split == "heads" else "minus_one"
    proto = attention_model(split=split, merge=merge, value_bias=value_bias, out_bias=out_bias, bias_first=bias_first,
                            dtype=dtype, opset=opset, heads_=heads_, head=head, seed=seed)
    model = ir.serde.deserialize_model(proto)
    pairs, rejected = heads.find_head_pairs(model)
    assert len(pairs) == 1, rejected
    pair = pairs[0]
    data = feeds(seed=seed, dtype=dtype)
    gram = joint.AugmentedGram()
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_tensor_value_info("merged_context", proto.graph.output[0].type.tensor_type.elem_type, None))
    gram.add(run(probe, data)[1].reshape(-1, heads_ * head))
    elimination = pair.eliminate(gram.result())
    tol = 2e-2 if half else 1e-5
    reference = run(proto, data)[0].astype(np.float64)
    full = run(rewritten(model, pair.fit_slices(elimination.fit(head)), pair.inner_values()), data)[0]
    np.testing.assert_allclose(full.astype(np.float64), reference, rtol=tol, atol=tol)
    keep = 1 + int(keep_share * (head - 1))
    fit = elimination.fit(keep)
    model, pair = ir.serde.deserialize_model(proto), None
    pair = heads.find_head_pairs(model)[0][0]
    sliced = run(rewritten(model, pair.fit_slices(fit), pair.inner_values()), data)[0].astype(np.float64)
    model = ir.serde.deserialize_model(proto)
    pair = heads.find_head_pairs(model)[0][0]
    padded = rewritten(model, [(next(u.node for u in v.uses()), v, a) for v, a in pair.fit_feeds(fit)])
    np.testing.assert_allclose(sliced, run(padded, data)[0].astype(np.float64), rtol=tol, atol=tol * 10)


# ----------------------------------------------------------------------------- through the pipeline


def redundant_heads():
    """An attention block whose value heads have rank 3 of 8: the joint fit keeps 3 dimensions a head."""
    return attention_model(low_rank=3, seed=11)


def test_the_pipeline_compresses_the_pair_and_reports_it():
    proto = redundant_heads()
    calibration = [feeds(count=16, seed=s) for s in range(4)]
    result, report = onnxlr.optimize(proto, calibration=calibration, param_budget=0.6, verify=False)
    entries = {entry["kind"]: entry for entry in report["calibration"]["pairs"]["found"]}
    assert (entries["attention-vo"]["up"], entries["attention-vo"]["down"]) == (["v_proj"], "o_proj")
    assert (entries["attention-qk"]["up"], entries["attention-qk"]["down"]) == (["q_proj"], "k_proj")
    assert report["calibration"]["pairs"]["not_pairs"] == []
    rows = {row["name"]: row for row in report["layers"]}
    # The value heads have rank 3 of 8: the pair is chosen, at 3 dimensions a head or fewer.
    assert entries["attention-vo"]["chosen"] and entries["attention-vo"]["kept"] <= 3
    assert rows["v_proj"]["method"] == rows["o_proj"]["method"] == "joint"
    assert rows["v_proj"]["partner"] == "o_proj" and rows["v_proj"]["full_rank"] == HEAD
    assert rows["v_proj"]["params_after"] == entries["attention-vo"]["kept"] * HEADS * (MODEL + 1)
    assert rows["o_proj"]["params_after"] == entries["attention-vo"]["kept"] * HEADS * MODEL + MODEL
    if entries["attention-qk"]["chosen"]:
        assert rows["q_proj"]["partner"] == "k_proj" and rows["k_proj"]["partner"] == "q_proj"
        assert rows["q_proj"]["params_after"] == entries["attention-qk"]["kept"] * HEADS * (MODEL + 1)
    onnx.checker.check_model(result, full_check=True)
    data = feeds(seed=20)
    assert run(result, data)[0].shape == run(proto, data)[0].shape


def test_target_search_measures_what_is_written():
    """The search's cosine at its chosen budget is the written model's: the runner's feeds for the V·O
    pair (V's columns and bias, O's rows and bias) are what the rewrite writes."""
    proto = redundant_heads()
    calibration = [feeds(count=16, seed=s) for s in range(4)]
    heldout = [feeds(count=8, seed=s) for s in (30, 31)]
    result, report = onnxlr.optimize(proto, calibration=calibration, heldout=heldout, target_cosine=0.995, verify=False)
    assert any(row["method"] == "joint" and row["name"] == "v_proj" for row in report["layers"])
    chosen = min((t for t in report["calibration"]["search"] if t["cosine"] >= 0.995), key=lambda t: t["budget"])
    reference = np.concatenate([run(proto, f)[0] for f in heldout]).ravel()
    written = np.concatenate([run(result, f)[0] for f in heldout]).ravel()
    measured = float(reference @ written / np.linalg.norm(reference) / np.linalg.norm(written))
    assert measured == pytest.approx(chosen["cosine"], abs=2e-5)


# ----------------------------------------------------------------------------- a real exporter's graph


def tiny_bert(path):
    """transformers' BertModel from a small config (random weights), exported by torch.onnx as models/minilm does."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models.minilm import export

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():  # trained-like: no two parameters equal (the exporter shares equal ones via Identity)
        for parameter in bert.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    rng = np.random.default_rng(0)
    example = {"input_ids": rng.integers(0, 120, (2, 12)).astype(np.int64), "attention_mask": np.ones((2, 12), np.int64)}
    export(Encoder(), example, path)
    return path


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert.onnx")


def bert_batch(count, seed):
    rng = np.random.default_rng(seed)
    mask = np.ones((count, 12), np.int64)
    mask[: count // 2, 9:] = 0  # padded sentences too
    return {"input_ids": rng.integers(0, 120, (count, 12)).astype(np.int64), "attention_mask": mask}


def test_a_transformers_bert_export_has_both_head_pairs_in_every_layer(bert_path):
    path = bert_path
    model = onnxlr.load(path).model
    values, value_rejected = heads.find_head_pairs(model)
    from onnxlr.coupled import scores

    products, product_rejected = scores.find_score_pairs(model)
    assert [p.up.node.name.split("/")[3] for p in values] == ["layer.0", "layer.1"]
    assert all((p.heads, p.width) == (4, 8) for p in values + products)
    assert len(products) == 2 and not product_rejected
    assert {reason for _, reason in value_rejected} == {heads.QUERY_OR_KEY}
    calibration = [bert_batch(16, seed) for seed in range(4)]
    original = onnx.load(path)
    result, report = onnxlr.optimize(original, calibration=calibration, param_budget=0.6, ops=("MatMul",), verify=False)
    kinds = sorted(entry["kind"] for entry in report["calibration"]["pairs"]["found"])
    assert kinds == ["attention-qk"] * 2 + ["attention-vo"] * 2 + ["mlp"] * 2
    assert report["calibration"]["pairs"]["not_pairs"] == []
    chosen = [e for e in report["calibration"]["pairs"]["found"] if e["chosen"] and e["kind"].startswith("attention")]
    assert chosen, report["calibration"]["pairs"]["found"]
    onnx.checker.check_model(result, full_check=True)
    data = bert_batch(6, 99)
    reference, out = run(original, data)[0], run(result, data)[0]
    assert out.shape == reference.shape and np.isfinite(out).all()
    cosine = float(np.sum(reference * out) / np.linalg.norm(reference) / np.linalg.norm(out))
    assert cosine > 0.9, cosine


@pytest.mark.parametrize("keep", [3, 8])
def test_sdpa_export_sliced_is_padded_and_keep_all_is_the_original(bert_path, keep):
    """transformers' SDPA attention as torch exports it reads the heads' shapes at run time (the query length,
    the value head size for a reshape of P·V) and scales both sides: every pair of both layers, sliced at k,
    computes what the padded feeds compute; at k = d it is the original."""
    from onnxlr.coupled import scores

    original = onnx.load(bert_path)
    data = bert_batch(4, 5)

    def pairs_of(model):
        return heads.find_head_pairs(model)[0] + scores.find_score_pairs(model)[0]

    model = ir.serde.deserialize_model(original)
    identity = np.eye(33)
    fits = [pair.eliminate((identity, identity) if pair.kind == "attention-qk" else identity).fit(keep)
            for pair in pairs_of(model)]
    assert [pair.kind for pair in pairs_of(model)] == ["attention-vo"] * 2 + ["attention-qk"] * 2
    slices = [s for pair, fit in zip(pairs_of(model), fits) for s in pair.fit_slices(fit)]
    sliced = rewritten(model, slices, [v for pair in pairs_of(model) for v in pair.inner_values()])
    model = ir.serde.deserialize_model(original)
    feeds_ = [(next(u.node for u in v.uses()), v, a) for pair, fit in zip(pairs_of(model), fits) for v, a in pair.fit_feeds(fit)]
    padded = rewritten(model, feeds_)
    out = run(sliced, data)[0]
    np.testing.assert_allclose(out, run(padded, data)[0], rtol=1e-4, atol=1e-4)
    if keep == 8:
        np.testing.assert_allclose(out, run(original, data)[0], rtol=1e-5, atol=1e-5)


def test_a_fused_attention_op_is_reported_not_paired():
    """onnxruntime's fused MultiHeadAttention (as its transformer optimizer writes it): the report says why."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", name], [f"{name}_out"], name=f"{name}_proj") for name in ("Wq", "Wk", "Wv")]
    nodes += [helper.make_node("MultiHeadAttention", ["Wq_out", "Wk_out", "Wv_out"], ["context"], domain="com.microsoft",
                               num_heads=HEADS, name="mha"),
              helper.make_node("MatMul", ["context", "Wo"], ["y"], name="o_proj")]
    weights = [init(name, rng.standard_normal((MODEL, HEADS * HEAD)).astype(np.float32)) for name in ("Wq", "Wk", "Wv")]
    weights.append(init("Wo", rng.standard_normal((HEADS * HEAD, MODEL)).astype(np.float32)))
    graph = helper.make_graph(nodes, "mha", [tensor_input("x", [2, SEQ, MODEL])], [tensor_input("y", [2, SEQ, MODEL])],
                              weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    data = {"x": rng.standard_normal((2, SEQ, MODEL)).astype(np.float32)}
    assert run(proto, data)[0].shape == (2, SEQ, MODEL)  # onnxruntime runs it
    result, report = onnxlr.optimize(proto, calibration=[data] * 2, param_budget=0.8, verify=False)
    not_pairs = {entry["node"]: entry["reason"] for entry in report["calibration"]["pairs"]["not_pairs"]}
    assert "fused MultiHeadAttention op" in not_pairs["mha"]
    assert report["calibration"]["pairs"]["found"] == []
