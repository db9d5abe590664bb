"""Attention Q·Kᵀ head pairs (onnxlr.coupled.scores): found from the query projection, exact when every head dimension
is kept, the padded feeds compute the sliced model, and heads of low rank lose nothing at that rank."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from test_heads import HEAD, HEADS, MODEL, attention_model, feeds, rewritten

from onnxlr.coupled import joint, scores


def found(proto):
    model = ir.serde.deserialize_model(proto)
    pairs, rejected = scores.find_score_pairs(model)
    assert len(pairs) == 1, rejected
    return model, pairs[0]


def input_correlation(data):
    """The augmented correlation of the projections' input x (Q and K read the same x here)."""
    gram = joint.AugmentedGram()
    gram.add(data["x"].reshape(-1, MODEL))
    return gram.result()


def elimination_of(proto, data):
    _, pair = found(proto)
    correlation = input_correlation(data)
    return pair.eliminate((correlation, correlation))


def sliced_and_padded(proto, fit, data):
    model, pair = found(proto)
    sliced = rewritten(model, pair.fit_slices(fit), pair.inner_values())
    onnx.checker.check_model(sliced, full_check=True)
    model, pair = found(proto)
    padded = rewritten(model, [(next(u.node for u in value.uses()), value, array) for value, array in pair.fit_feeds(fit)])
    return run(sliced, data)[0].astype(np.float64), run(padded, data)[0].astype(np.float64)


def test_found_from_the_query_with_its_key():
    _, pair = found(attention_model())
    assert (pair.up.node.name, pair.down.node.name, pair.heads, pair.width, pair.kind) == ("q_proj", "k_proj", HEADS,
                                                                                           HEAD, "attention-qk")
    assert all(entry is not None for entry in pair.splits)
    assert pair.weight_params(HEAD) == 2 * HEADS * HEAD * (MODEL + 1)


@pytest.mark.parametrize("split", ["concat", "constant", "inferred", "heads"])
@pytest.mark.parametrize("side_scales", [False, True])
def test_keeping_every_dimension_is_the_original(split, side_scales):
    proto = attention_model(split=split, merge="constant" if split == "heads" else "minus_one", side_scales=side_scales)
    model, pair = found(proto)
    fit = elimination_of(proto, feeds()).fit(HEAD)
    slices = pair.fit_slices(fit)
    for _, old, array in slices[:4]:
        np.testing.assert_array_equal(array, ir.convenience.get_const_tensor(old).numpy())
    data = feeds(seed=5)
    np.testing.assert_allclose(run(rewritten(model, slices, pair.inner_values()), data)[0], run(proto, data)[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keep", [1, 4, 7])
@pytest.mark.parametrize("side_scales", [False, True])
def test_the_padded_feeds_compute_the_sliced_model(keep, side_scales):
    proto = attention_model(side_scales=side_scales)
    fit = elimination_of(proto, feeds()).fit(keep)
    sliced, padded = sliced_and_padded(proto, fit, feeds(seed=7))
    np.testing.assert_allclose(sliced, padded, rtol=1e-5, atol=1e-5)
    probe = onnx.ModelProto()
    probe.CopyFrom(attention_model(side_scales=side_scales))
    model, pair = found(probe)
    proto_sliced = rewritten(model, pair.fit_slices(fit), pair.inner_values())
    proto_sliced.graph.output.append(helper.make_tensor_value_info("q_heads", onnx.TensorProto.FLOAT, None))
    assert run(proto_sliced, feeds(seed=7))[1].shape == (3, HEADS, 5, keep)


def test_errors_fall_with_k_and_a_low_rank_query_loses_nothing_at_its_rank():
    """Each head's query weight has rank 2, so with the bias its scores have rank 3: k = 3 is exact."""
    proto = attention_model(query_rank=2, seed=3)
    data = feeds(count=20, seed=2)
    elimination = elimination_of(proto, data)
    errors = [elimination.error(k) for k in range(1, HEAD + 1)]
    assert errors[-1] == 0.0 and all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[2] < 1e-5 < 1e-2 < errors[1]  # what is left at k = 3 is the ridge's (1e-6 of the diagonal)
    fit = elimination.fit(3)
    assert fit.relative_error == pytest.approx(errors[2], abs=1e-12)
    model, pair = found(proto)
    check = feeds(seed=11)
    out = run(rewritten(model, pair.fit_slices(fit), pair.inner_values()), check)[0]
    np.testing.assert_allclose(out, run(proto, check)[0], rtol=1e-3, atol=1e-3)


def test_keys_of_another_width_are_not_a_pair():
    """Grouped-query attention (fewer key heads) is not recognized: the query says why."""
    proto = attention_model()
    for node in proto.graph.node:
        if node.op_type == "Transpose" and node.input[0] == "k_split":
            node.attribute[0].ints[:] = [0, 2, 1, 3]  # keys not transposed for Q·Kᵀ
    model = ir.serde.deserialize_model(proto)
    pairs, rejected = scores.find_score_pairs(model)
    assert not pairs and "keys are not a projection" in dict((n.name, r) for n, r in rejected)["q_proj"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split=st.sampled_from(["concat", "constant", "inferred", "heads"]), bias_first=st.booleans(),
       side_scales=st.booleans(), half=st.booleans(), opset=st.sampled_from([13, 17, 21]), heads_=st.integers(1, 4),
       head=st.integers(2, 6), seed=st.integers(0, 2**16), keep_share=st.floats(0.0, 1.0))
def test_exact_at_full_size_and_padded_is_sliced_across_shapes_dtypes_and_opsets(split, bias_first, side_scales, half,
                                                                                 opset, heads_, head, seed, keep_share):
    dtype = np.float16 if half else np.float32
    proto = attention_model(split=split, merge="constant" if split == "heads" else "minus_one", bias_first=bias_first,
                            side_scales=side_scales, dtype=dtype, opset=opset, heads_=heads_, head=head, seed=seed)
    data = feeds(seed=seed, dtype=dtype)
    elimination = elimination_of(proto, data)
    tol = 2e-2 if half else 1e-5
    reference = run(proto, data)[0].astype(np.float64)
    full, _ = sliced_and_padded(proto, elimination.fit(head), data)
    np.testing.assert_allclose(full, reference, rtol=tol, atol=tol)
    sliced, padded = sliced_and_padded(proto, elimination.fit(1 + int(keep_share * (head - 1))), data)
    np.testing.assert_allclose(sliced, padded, rtol=tol, atol=tol * 10)
