"""Decoder language models with a KV cache, as transformers + torch.onnx export them (issue 34, first step): inputs
synthesized for such a model keep its lengths consistent (the attention mask covers the cached tokens and the new
ones, position ids count on from the cache), so default flags run it, and verification reports its perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from graphs import onnxlr_cli

from onnxlr.model_io.inputs import InputSpec, cache_inputs, resolve_shapes, synthesize_inputs
from onnxlr.verification.task_metrics import language_model_metrics

LAYERS, KV_HEADS, HEAD = 2, 2, 16


def decoder_specs(mask_dim: str = "total") -> dict[str, InputSpec]:
    specs = {"input_ids": InputSpec(np.dtype("int64"), ("batch", "seq"), high=512),
             "attention_mask": InputSpec(np.dtype("int64"), ("batch", mask_dim)),
             "position_ids": InputSpec(np.dtype("int64"), ("batch", "seq"))}
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            specs[f"past_key_values.{layer}.{kind}"] = InputSpec(np.dtype("float32"), ("batch", KV_HEADS, "past", HEAD))
    return specs


def test_the_mask_covers_the_cache_and_the_new_tokens_and_positions_count_on():
    specs = decoder_specs()
    assert cache_inputs(specs) == [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    shapes = resolve_shapes(specs, samples=3)
    past, new = shapes["past_key_values.0.key"][2], shapes["input_ids"][1]
    assert shapes["attention_mask"] == (3, past + new)
    feeds = synthesize_inputs(specs, samples=3)
    assert (feeds["position_ids"] == np.arange(past, past + new)).all()
    assert feeds["input_ids"].max() < 512
    # --shape on the mask, or a mask that shares the ids' length, is left as it is
    assert resolve_shapes(specs, 3, {"attention_mask": (3, 7)})["attention_mask"] == (3, 7)
    same = resolve_shapes(decoder_specs(mask_dim="seq"), 3)
    assert same["attention_mask"] == same["input_ids"]


def test_next_token_metrics_read_the_new_tokens_columns_of_a_cache_long_mask():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (2, 5))
    logits = rng.standard_normal((2, 5, 30))
    other = logits + rng.standard_normal(logits.shape)
    tail = np.ones((2, 5), np.int64)
    tail[1, :2] = 0  # left padding among the new tokens
    cached = np.concatenate([np.ones((2, 4), np.int64), tail], axis=1)
    assert language_model_metrics(logits, other, ids, cached) == language_model_metrics(logits, other, ids, tail)


def export_llama(path: Path) -> Path:
    """A random-weight LLaMA-style decoder (RMSNorm, SwiGLU, rotary positions, grouped-query attention) exported by
    torch.onnx with its cache: past_key_values.N.key/value in, present.N.key/value out."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for layer in range(LAYERS):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [tensor for layer in out.past_key_values.layers for tensor in (layer.keys, layer.values)]
            return (out.logits, *present)

    past = [torch.randn(1, KV_HEADS, 4, HEAD) for _ in range(2 * LAYERS)]
    names = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, **{name: {0: "batch", 2: "past"} for name in names}}
    torch.onnx.export(WithCache(), (torch.randint(0, 512, (1, 8)), torch.ones(1, 12, dtype=torch.int64),
                                    torch.arange(4, 12)[None], *past), str(path),
                      input_names=["input_ids", "attention_mask", "position_ids", *names],
                      output_names=["logits", *[name.replace("past_key_values", "present") for name in names]],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


@pytest.mark.slow
def test_a_cached_llama_export_runs_with_default_flags_and_reports_its_perplexity(tmp_path):
    source = export_llama(tmp_path / "llama.onnx")
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"))
    # random weights do not compress: the default gate fails, and says so (never a bad-input exit 2 or a crash)
    assert result.returncode in (0, 1), result.stderr
    if result.returncode == 1:
        assert "verification failed: output 'logits'" in result.stderr
    report_path = tmp_path / "report.json"
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--rank-ratio", "0.9", "--no-gate",
                        "--report", str(report_path))
    assert result.returncode == 0, result.stderr
    verification = json.loads(report_path.read_text())["verification"]
    past, new = verification["inputs"]["past_key_values.0.key"][2], verification["inputs"]["input_ids"][1]
    assert verification["inputs"]["attention_mask"][1] == past + new
    logits = verification["providers"]["cpu"]["outputs"]["logits"]
    assert logits["next_tokens"] == verification["samples"] * (new - 1)
    assert logits["perplexity"] > 0 and logits["reference_perplexity"] > 0
    assert "next-token perplexity on the inputs (logits, cpu" in result.stdout
    assert "through the KV cache and without it, cpu): original agree, written agree" in result.stdout
    assert verification["generation"]["passed"]


def broken_cache(source: Path, target: Path) -> Path:
    """The model with every present output scaled by 0.5: the first step is right, the cached steps are not."""
    import onnx
    from onnx import helper

    model = onnx.load(source)
    for output in model.graph.output:
        if output.name.startswith("present"):
            for node in model.graph.node:
                node.output[:] = [f"{name}_raw" if name == output.name else name for name in node.output]
            model.graph.node.append(helper.make_node("Mul", [f"{output.name}_raw", "half"], [output.name]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    onnx.save(model, target)
    return target


@pytest.mark.slow
def test_greedy_tokens_through_the_cache_must_equal_those_without_it(tmp_path):
    import onnxlr
    from onnxlr.model_io.inputs import input_specs
    from onnxlr.verification.generation import cache_layout, check_generation

    source = export_llama(tmp_path / "llama.onnx")
    layout = cache_layout(input_specs(onnxlr.load(source).model),
                          ["logits", *[f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]])
    assert layout is not None and layout.mask == "attention_mask" and layout.positions == "position_ids"
    assert layout.cache["past_key_values.1.value"] == "present.1.value"
    prompts = [np.array([5, 17, 300, 2]), np.array([9])]
    sound = check_generation({"original": str(source)}, layout, prompts, steps=6)
    assert sound["passed"] and len(sound["models"]["original"]["cached"][0]) == 6
    broken = broken_cache(source, tmp_path / "broken.onnx")
    assert not check_generation({"written": str(broken)}, layout, prompts, steps=6)["passed"]
    # in verification: the written model's broken cache fails it, whatever the gates
    figures = onnxlr.verify(source, broken, no_gate=True)
    assert not figures["passed"]
    assert figures["generation"]["models"]["original"]["agree"] and not figures["generation"]["models"]["written"]["agree"]
    assert any("through its KV cache differ" in failure for failure in figures["failures"])
    assert cache_layout(input_specs(onnxlr.load(source).model), ["logits"]) is None  # no present outputs
