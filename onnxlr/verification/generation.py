"""A decoder's KV cache, checked by generating: greedy tokens produced step by step through the cache must equal the
same model's tokens recomputed from the whole sequence with an empty cache (the cache path is where exports break).

A model qualifies when it has `*input_ids` (samples x tokens), cache inputs named like a past
(onnxlr.model_io.inputs.cache_inputs) that each have a present output of the same name with "past" replaced by
"present" (transformers' and Optimum's `past_key_values.N.key` / `present.N.key`), and an output named like logits.
An `*attention_mask` is all ones over past + new tokens; `*position_ids` count on from the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GENERATED_TOKENS = 8  # greedy steps per prompt
PROMPTS = 2  # prompts (the first samples of the verified inputs)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How a decoder's inputs and outputs carry its cache."""

    ids: str
    logits: str
    cache: dict[str, str]  # cache input -> its present output
    mask: str | None = None
    positions: str | None = None


def cache_layout(inputs: Mapping[str, Any], outputs: Sequence[str]) -> CacheLayout | None:
    """The cache layout of a model with these input specs (onnxlr.model_io.inputs.InputSpec) and output names, or
    None when it is not a decoder with a KV cache."""
    from onnxlr.model_io.inputs import cache_inputs, token_input

    ids, mask, positions = (token_input(inputs, role) for role in ("input_ids", "attention_mask", "position_ids"))
    logits = next((name for name in outputs if "logit" in name.lower()), None)
    past = cache_inputs(inputs)
    cache = {name: present for name in past if (present := _present(name, outputs)) is not None}
    if ids is None or logits is None or not past or len(cache) != len(past):
        return None
    if any(name not in (ids, mask, positions, *cache) for name in inputs):
        return None  # an input the generation loop would not know how to fill
    return CacheLayout(ids=ids, logits=logits, cache=cache, mask=mask, positions=positions)


def _present(past: str, outputs: Sequence[str]) -> str | None:
    for old, new in (("past_key_values", "present"), ("past", "present")):
        if old in past and past.replace(old, new) in outputs:
            return past.replace(old, new)
    return None


def greedy_tokens(session: Any, layout: CacheLayout, prompt: np.ndarray, steps: int, cached: bool) -> np.ndarray:
    """`steps` greedy tokens after `prompt` (one sample's ids): through the cache, feeding one token a step, or
    recomputing the whole sequence each step with an empty cache."""
    specs = {value.name: value for value in session.get_inputs()}
    empty = {name: _empty_cache(specs[name]) for name in layout.cache}
    tokens = [int(token) for token in prompt]
    past = dict(empty)
    produced = []
    for step in range(steps):
        new = tokens if (step == 0 or not cached) else tokens[-1:]
        start = len(tokens) - len(new) if cached else 0
        feeds = {layout.ids: np.asarray([new], dtype=np.int64), **(past if cached else empty)}
        if layout.mask is not None:
            feeds[layout.mask] = np.ones((1, start + len(new)), dtype=np.int64)
        if layout.positions is not None:
            feeds[layout.positions] = np.arange(start, start + len(new), dtype=np.int64)[None]
        names = [layout.logits, *layout.cache.values()]
        results = dict(zip(names, session.run(names, feeds)))
        token = int(np.argmax(results[layout.logits][0, -1]))
        produced.append(token)
        tokens.append(token)
        past = {name: results[present] for name, present in layout.cache.items()}
    return np.asarray(produced)


def _empty_cache(spec: Any) -> np.ndarray:
    """A cache input with no tokens: batch 1, the declared heads and head size, length 0."""
    shape = [1 if index == 0 else (dim if isinstance(dim, int) else 0) for index, dim in enumerate(spec.shape)]
    dtype = np.float16 if "float16" in spec.type else np.float32
    return np.zeros(shape, dtype=dtype)


def check_generation(models: Mapping[str, Any], layout: CacheLayout, prompts: Sequence[np.ndarray],
                     steps: int = GENERATED_TOKENS) -> dict[str, Any]:
    """For each model (label -> path or bytes): its greedy tokens with and without the cache, on CPU, and whether
    they agree; "passed" when each model's two generations are equal."""
    from onnxlr.verification.runtime import make_session

    report: dict[str, Any] = {"steps": steps, "prompts": len(prompts), "models": {}}
    for label, model in models.items():
        session = make_session(model, "cpu")
        cached = [greedy_tokens(session, layout, prompt, steps, cached=True).tolist() for prompt in prompts]
        whole = [greedy_tokens(session, layout, prompt, steps, cached=False).tolist() for prompt in prompts]
        report["models"][label] = {"cached": cached, "uncached": whole, "agree": cached == whole}
    report["passed"] = all(entry["agree"] for entry in report["models"].values())
    return report
