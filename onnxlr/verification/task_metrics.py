"""Task metrics: what a deployment asks of an output beyond its cosine, and the inputs they read.

- neighbour_agreement: embeddings (2-D, or per-token outputs mean-pooled over the attention mask) keep each
  sample's NEIGHBOURS nearest samples;
- language_model_metrics: next-token perplexity of both models and next-token top-1, for logits beside input_ids;
- pair_metrics: Spearman of each model's cosine similarities of scored sentence pairs with their scores;
- looks_like_scores: whether top-1 agreement means something for an output;
- without_padding, attention_mask, token_ids, token_inputs, joined_rows: the attention mask and ids among the
  inputs, and padded positions left out of every comparison.

onnxlr.verification.verify computes them per output; the --target-* search on a task metric
(onnxlr.calibrate.datafit.task_metric) through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

NEIGHBOURS = 5  # neighbour_agreement: each sample's this many nearest samples
NEIGHBOUR_SAMPLES = 2048  # ... among the first this many (the similarity matrix is samples x samples)


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean over samples of the share of its k nearest other samples (cosine similarity of the rows) in the
    reference that are also among its k nearest in the candidate: whether a search over these embeddings still
    finds the same neighbours. On the first NEIGHBOUR_SAMPLES samples."""
    reference, candidate = reference[:NEIGHBOUR_SAMPLES], candidate[:NEIGHBOUR_SAMPLES]

    def nearest(rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float64)
        unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1, kind="stable")[:, :k]

    ours, theirs = nearest(reference), nearest(candidate)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))


def is_language_model_logits(array: np.ndarray, token_ids: np.ndarray | None, name: str = "") -> bool:
    """An output named like logits or scores, of samples x tokens x vocabulary floats, beside the input_ids it was
    computed from (the vocabulary covers every id)."""
    return (token_ids is not None and array.dtype.kind == "f" and array.ndim == 3 and token_ids.ndim == 2
            and array.shape[:2] == token_ids.shape and array.shape[1] > 1 and token_ids.size > 0
            and 0 <= int(token_ids.min()) and int(token_ids.max()) < array.shape[2]
            and any(word in name.lower() for word in ("logit", "score")))


def language_model_metrics(reference: np.ndarray, candidate: np.ndarray, token_ids: np.ndarray,
                           mask: np.ndarray | None) -> dict[str, float]:
    """Next-token perplexity of both models on the inputs' own text, and their next-token top-1 agreement, over the
    positions whose next token is attended. With a KV cache the mask also covers the cached tokens: its last columns
    are the new ones'."""
    attended = np.ones(token_ids.shape, bool)
    if mask is not None and mask.shape[0] == token_ids.shape[0] and mask.shape[1] >= token_ids.shape[1]:
        attended = np.asarray(mask)[:, mask.shape[1] - token_ids.shape[1]:] != 0
    where = attended[:, :-1] & attended[:, 1:]  # position t predicts token t + 1
    targets = token_ids[:, 1:][where]
    if not targets.size:
        return {}

    def perplexity(logits: np.ndarray) -> float:
        rows = logits[:, :-1][where].astype(np.float64)
        peak = rows.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
        return float(np.exp(np.mean(log_norm - rows[np.arange(len(rows)), targets])))

    ours, theirs = perplexity(reference), perplexity(candidate)
    agree = np.argmax(reference[:, :-1][where], axis=1) == np.argmax(candidate[:, :-1][where], axis=1)
    return {"reference_perplexity": ours, "perplexity": theirs, "perplexity_kept": ours / theirs,
            "top1_agreement": float(np.mean(agree)), "next_tokens": int(targets.size)}


def pair_metrics(reference: np.ndarray, candidate: np.ndarray, scores: np.ndarray, mask: np.ndarray | None,
                 name: str = "") -> dict[str, Any] | None:
    """Scored pairs run through both models (the first sentences' rows, then the second ones'): for an embedding
    output (2-D and not scores, or per-token and pooled over `mask`), the Spearman correlation of each model's cosine
    similarities with the scores and between them; None for other outputs."""
    from scipy.stats import spearmanr

    if reference.dtype.kind != "f" or not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return None
    if reference.ndim == 3 and mask is not None and reference.shape[:2] == mask.shape:
        reference, candidate = mean_pooled(reference, mask), mean_pooled(candidate, mask)
    elif reference.ndim != 2 or looks_like_scores(reference, name):
        return None
    count = len(scores)

    def similarities(rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float64)
        unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
        return np.sum(unit[:count] * unit[count:2 * count], axis=1)

    ours, theirs = similarities(reference), similarities(candidate)
    return {"spearman": float(spearmanr(theirs, scores).statistic),
            "reference_spearman": float(spearmanr(ours, scores).statistic),
            "similarity_spearman": float(spearmanr(ours, theirs).statistic), "pairs": count}


def token_ids(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The input_ids among a model's inputs (a 2-D integer input named *input_ids*), if any."""
    return next((np.asarray(array) for name, array in feeds.items() if name.endswith("input_ids")
                 and np.ndim(array) == 2 and np.asarray(array).dtype.kind in "iu"), None)


def mean_pooled(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each sample's token outputs averaged over its attended tokens (samples x features)."""
    weights = (mask != 0).astype(np.float64)[..., None]
    return (tokens.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1)


def without_padding(outputs: Mapping[str, np.ndarray], mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """`outputs` with the padded positions of per-token float outputs (first axes: `mask`'s) set to zero."""
    if mask is None or mask.all():
        return dict(outputs)
    padded = mask == 0
    return {name: np.where(padded.reshape(padded.shape + (1,) * (array.ndim - 2)), 0, array).astype(array.dtype)
            if array.dtype.kind == "f" and array.ndim >= 2 and array.shape[:2] == mask.shape else array
            for name, array in outputs.items()}


def attention_mask(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The attention mask among a model's inputs (a 2-D integer or boolean input named *attention_mask*), if any."""
    return next((np.asarray(array) for name, array in feeds.items() if name.endswith("attention_mask")
                 and np.ndim(array) == 2 and np.asarray(array).dtype.kind in "biu"), None)


def token_inputs(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The attention mask and input ids of batches, each joined into one (what the task metrics read beside the
    outputs), where every batch has it at one length."""
    joined = {}
    for name, pick in (("attention_mask", attention_mask), ("input_ids", token_ids)):
        array = joined_rows([pick(batch) for batch in batches])
        if array is not None:
            joined[name] = array
    return joined


def joined_rows(masks: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Batches' token arrays (attention masks, input ids) as one, samples along the first axis (None when a batch has
    none or their lengths differ)."""
    arrays = [mask for mask in masks if mask is not None]
    if not arrays or len(arrays) != len(masks) or len({mask.shape[1] for mask in arrays}) != 1:
        return None
    return np.concatenate(arrays)


SCORE_WORDS = ("logit", "score", "prob", "class", "label", "pred")
EMBEDDING_WORDS = ("embed", "pool", "hidden", "feature", "encod", "state", "vector", "token")


def looks_like_scores(array: np.ndarray, name: str = "") -> bool:
    """Whether top-1 agreement means something: a 2-D float output (samples x classes) that is not an embedding.

    A name with logit/score/prob/class/label/pred says scores; else a name with embed/pool/hidden/feature/
    encod/state/vector/token, or rows that are L2-normalized with negative entries (sentence embeddings),
    say an embedding, whose argmax is meaningless."""
    if array.dtype.kind != "f" or array.ndim != 2 or not 2 <= array.shape[-1] <= 1_000_000:
        return False
    lowered = name.lower()
    if any(word in lowered for word in SCORE_WORDS):
        return True
    if any(word in lowered for word in EMBEDDING_WORDS):
        return False
    return not _unit_rows(array)


def _unit_rows(array: np.ndarray) -> bool:
    """Rows of L2 norm 1 with negative entries: normalized embeddings (probabilities are >= 0)."""
    if not array.size or not np.isfinite(array).all() or not (array < 0).any():
        return False
    norms = np.linalg.norm(array.astype(np.float64), axis=-1)
    return bool(np.all(np.abs(norms - 1) < 1e-3))
